"""`setseq export`: a concept file as a standard rank-r LoRA for the base model's own tools.

    setseq export dancer.safetensors --format comfyui --out dancer_lora.safetensors
    setseq export dancer.safetensors --identity 1 --motion 0.5 --format diffusers --out half.safetensors

lora_A = A1 and lora_B = identity * B1 + motion * B2 per layer: the scales are baked into lora_B and
the file has no alpha key, so the update is exactly lora_B @ lora_A (lora/export.py). Several concept
files concatenate along the rank (their updates add). An existing --out is kept unless --force.
A concept of a two-expert base (Wan 2.2 A14B) writes one file per expert it trained,
OUT.high_noise.safetensors and OUT.low_noise.safetensors (diffusers: load the second with
load_into_transformer_2=True).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from setseq.args import check_new_files, finite_float

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def register(subparsers) -> None:
    from lora.export import FORMATS

    p = subparsers.add_parser(
        "export", help="export a concept as a standard LoRA file (ComfyUI / diffusers names, no alpha)",
        description="Write a concept (or several, concatenated along the rank) as a rank-r LoRA with the "
                    "identity and motion scales baked into lora_B and no alpha key.")
    p.add_argument("concepts", nargs="+", metavar="CONCEPT", help="concept file(s) from `setseq personalize`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="comfyui: Wan's original names (diffusion_model.blocks.0.self_attn.q...); "
                        "diffusers: WanTransformer3DModel names (transformer.blocks.0.attn1.to_q...)")
    p.add_argument("--identity", type=finite_float, default=1.0,
                   help="identity scale alpha baked in (default 1)")
    p.add_argument("--motion", type=finite_float, default=1.0,
                   help="motion scale beta baked in (default 1)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32",
                   help="tensor dtype of the file (default fp32)")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora.concept import load_concept
    from lora.export import concept_experts, expert_path, save_lora

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors")
    concepts = [load_concept(path) for path in args.concepts]
    experts = sorted({e for c in concepts for e in concept_experts(c)}, reverse=True)  # high, then low
    targets = {e: expert_path(out, e) for e in experts} or {None: out}
    check_new_files(list(targets.values()), "--out", args.force)
    names = ", ".join(c.name for c in concepts)
    for expert, path in targets.items():
        state = save_lora(path, concepts, args.format, args.identity, args.motion, _DTYPES[args.dtype],
                          expert)
        rank = max(t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight"))
        which = "" if expert is None else f"{expert}-noise expert, "
        print(f"wrote {path}: {which}{len(state)} keys, {len(state) // 2} modules, rank {rank}, format "
              f"{args.format}, identity {args.identity:g}, motion {args.motion:g}, no alpha key "
              f"(concepts: {names})")
    return 0
