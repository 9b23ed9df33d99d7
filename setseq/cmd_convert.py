"""`setseq convert --from {wan,diffusers} SRC --out DIR`: a public Wan 2.1 / 2.2 release -> our checkpoint
folder.

The folder (config.json + dit/vae/text_encoder safetensors + tokenizer) loads by path in every
command (`--base DIR`) and `setseq info DIR` describes it.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from weights.checkpoint import PARTS, describe_checkpoint
from weights.convert import LAYOUTS, convert
from weights.load import DTYPES


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert Wan 2.1 / 2.2 weights (original or diffusers layout)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="layout", choices=LAYOUTS, required=True,
                   help="source layout: 'wan' (Wan-AI/Wan2.1-T2V-*, Wan2.2-T2V-A14B, Wan2.2-TI2V-5B) or "
                        "'diffusers' (...-Diffusers)")
    p.add_argument("src", metavar="SRC", help="local folder of the release (nothing is downloaded)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint folder to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=[*sorted(DTYPES), "fp8"], default="bf16",
                   help="dtype of the saved weights (default bf16: half the size of fp32); fp8: the DiT "
                        "blocks' linear weights as float8_e4m3fn with 128x128 tile scales, the rest bf16")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of parts to convert (default {','.join(PARTS)})")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model file (default: the release's own spiece.model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    done = convert(args.src, args.out, args.layout, dtype=args.dtype, parts=parts, tokenizer=args.tokenizer,
                   progress=tqdm)
    for note in done.notes:
        print(f"note: {note}")
    print("\n".join(describe_checkpoint(done.out)))
    return 0
