"""`setseq generate`: a video from a base model, concept files and a prompt.

    setseq generate --base wan-1.3b-dir --concept dancer.safetensors \\
        --prompt "A [v] man in a cap dancing on the moon. He is performing [u] dancing motion." --out moon.mp4

Writes FILE.mp4 and FILE.gif (and FILE.png, a contact sheet, with --contact-sheet). Several --concept
flags mix separately trained concepts (each its own adapter and tokens); --region confines one to a box.
--identity / --motion scale every concept's identity and motion terms (stylization: --motion 0 keeps the
look, drops the learned motion); `--concept FILE:ALPHA:BETA` sets them for one concept. --reference
VIDEO: the sheet shows it first, FILE.metrics.json holds MSE and temporal coherence against it (and on
the tiny base the toy world's object instruments); --clip DIR adds CLIP-T, --arcface FILE (an IResNet
backbone) ArcFace identity similarity to the reference inside --face-box.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import ModelConfig, parse_size
from setseq.args import (
    add_memory_flags,
    check_new_files,
    finite_float,
    guidance_scale,
    note_offload,
    parse_box,
    positive_float,
    read_first_frame,
    warn_unreadable,
)
from setseq.scoring import check_scorer_args, load_scorers, read_reference, wants_scores, write_scores

if TYPE_CHECKING:
    from lora.concept import Concept

_SCALES = re.compile(r"^(?P<path>.+?):(?P<alpha>[^:]+):(?P<beta>[^:]+)$")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate a video with concepts (edit by reprompting, stylize by scales)",
        description="Sample a video from a base model with concept files applied: Euler steps on the flow "
                    "ODE with classifier-free guidance and self-conditioning (when the base has it).")
    p.add_argument("--base", required=True,
                   help="base model: a checkpoint folder (setseq convert), or a preset name with committed "
                        "weights (tiny: assets/tiny), or any preset with --random-weights")
    p.add_argument("--tokenizer", help="sentencepiece model, when the base checkpoint ships none")
    p.add_argument("--concept", action="append", default=[], metavar="FILE[:ALPHA:BETA]",
                   help="concept file (repeat to mix several); ALPHA:BETA set its identity and motion scales")
    p.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="confine the i-th --concept to a box (fractions of the frame; 0,0,0.5,1: the left "
                        "half): its adapters act only there, against one concept's look leaking to others")
    p.add_argument("--prompt", required=True,
                   help='e.g. "A [v] man in a cap on the moon. He does [u] dancing."')
    p.add_argument("--negative-prompt", default="",
                   help="the unconditional prompt of guidance (default: empty)")
    p.add_argument("--identity", type=finite_float, default=1.0,
                   help="identity scale alpha of every concept (default 1)")
    p.add_argument("--motion", type=finite_float, default=1.0,
                   help="motion scale beta of every concept (default 1)")
    p.add_argument("--steps", type=int,
                   help="Euler steps (default: the base model's own, ModelConfig.sample_steps)")
    p.add_argument("--guidance", type=guidance_scale,
                   help="classifier-free guidance scale (default: the base model's own, "
                        "ModelConfig.guidance, e.g. 5 for Wan 2.1, 1 (off) for tiny; the paper samples at 8)")
    p.add_argument("--low-noise-guidance", type=guidance_scale,
                   help="two-expert bases (Wan 2.2 A14B): guidance of the low-noise stage (default: the "
                        "base's own, 3 for A14B; --guidance alone sets both stages)")
    p.add_argument("--shift", type=positive_float, help="timestep shift (default: the base model's own)")
    p.add_argument("--no-self-cond", dest="self_cond", action="store_false", default=None,
                   help="do not feed back the x0 estimate (default: on when the base has self-conditioning)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same seed gives the same video)")
    p.add_argument("--random-weights", action="store_true",
                   help="randomly initialized weights for a preset --base (tests, timing; nothing learned)")
    p.add_argument("--base-seed", type=int, default=0, help="init seed of --random-weights")
    p.add_argument("--frames", type=int, help="frames, 1 + k * the VAE's time compression (default per base)")
    p.add_argument("--size", help="HxW in pixels, e.g. 480x832 (default per base)")
    p.add_argument("--fps", type=positive_float,
                   help="frame rate of the written files (default: the base's own: Wan 2.1 16, TI2V-5B 24, "
                        "else 8)")
    p.add_argument("--out", required=True, help="the mp4 to write; the gif (and png) go beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--contact-sheet", action="store_true", help="also write FILE.png: one column per frame")
    p.add_argument("--reference", help="a video to compare with: first row of the sheet, FILE.metrics.json")
    p.add_argument("--image", help="image-to-video (Wan 2.2 TI2V-5B): the first frame, an image (or a "
                   "video's first frame) centre-cropped to --size; its latent stays frame 0 at flow time 0")
    p.add_argument("--clip", help="a local HF CLIP folder (e.g. clip-vit-large-patch14): adds CLIP-T to "
                   "FILE.metrics.json")
    p.add_argument("--arcface", help="an insightface arcface_torch IResNet backbone (.pth): adds ArcFace "
                   "identity similarity to --reference to FILE.metrics.json")
    p.add_argument("--face-box", dest="face_box", help="x0,y0,x1,y1 as fractions of the frame: where the "
                   "face is, for --arcface (no detector; default the centred square)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="base weights dtype (default: bf16 on cuda)")
    add_memory_flags(p, sampling=True)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def parse_concept(text: str, identity: float, motion: float) -> tuple[Path, float, float]:
    """'FILE' or 'FILE:ALPHA:BETA' -> (path, alpha, beta); plain FILE takes the global scales."""
    m = _SCALES.match(text)
    if m is None or Path(text).is_file():
        return Path(text), identity, motion
    try:
        return Path(m["path"]), finite_float(m["alpha"]), finite_float(m["beta"])
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--concept {text!r}: ALPHA and BETA must be finite numbers ({err}), "
                         "e.g. dancer.safetensors:1:0.5") from None


def shape_of(args: argparse.Namespace, base_cfg: ModelConfig) -> tuple[int, tuple[int, int]]:
    default = base_cfg.default_clip
    if default is None and (args.frames is None or args.size is None):
        raise ValueError(f"base {base_cfg.name!r} has no default video shape; pass --frames and --size")
    frames = args.frames if args.frames is not None else default[0]
    size = parse_size(args.size) if args.size is not None else default[1:]
    return frames, size


def check_out(args: argparse.Namespace) -> None:
    """--out names an .mp4; it and every file written beside it is new, or --force replaces it."""
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {str(out)!r} must name an .mp4 file "
                         "(the .gif and .png are written beside it)")
    suffixes = [".mp4", ".gif"] + [".png"] * args.contact_sheet + [".metrics.json"] * wants_scores(args)
    check_new_files([out.with_suffix(s) for s in suffixes], "--out", args.force)


def load_pipeline(args: argparse.Namespace):
    from sample.generate import Pipeline
    from weights.base import load_base

    base = load_base(args.base, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                     random_weights=args.random_weights, seed=args.base_seed, base_dtype=args.base_dtype,
                     offload_blocks=args.offload_blocks or 0, offload_idle_expert=args.offload_idle_expert)
    note_offload("generate", args.offload_blocks, args.device, args.offload_idle_expert)
    return Pipeline.of(base)


def check_args(args: argparse.Namespace) -> list[tuple[Path, Concept, float, float]]:
    """Every check that needs no base weights; returns the concepts read as (path, concept, alpha, beta)."""
    from sample.generate import read_concept_file

    check_out(args)
    concepts = [parse_concept(text, args.identity, args.motion) for text in args.concept]
    if len(args.region) > len(concepts):
        raise ValueError(f"{len(args.region)} --region for {len(concepts)} --concept: the i-th --region "
                         "confines the i-th --concept")
    args.region = [parse_box(text, "--region") for text in args.region]
    check_scorer_args(args)
    return [(path, read_concept_file(path), alpha, beta) for path, alpha, beta in concepts]


def run(args: argparse.Namespace) -> int:
    from lora.regions import box_weights
    from sample.generate import GenerateConfig, add_concept_file, check_prompt_tokens, generate
    from sample.media import write_video_files
    from weights.base import base_config

    concepts = check_args(args)
    base_cfg = base_config(args.base, args.random_weights)  # a preset without weights: refused here
    frames, size = shape_of(args, base_cfg)
    base_cfg.latent_shape(frames, size)  # bad --frames / --size: an error before any weights load
    gen = GenerateConfig(frames=frames, size=size, steps=args.steps, guidance=args.guidance, shift=args.shift,
                         seed=args.seed, negative_prompt=args.negative_prompt, self_cond=args.self_cond,
                         low_noise_guidance=args.low_noise_guidance)
    g = gen.resolved(base_cfg)  # bad --steps / --guidance: an error before any weights load
    for box in args.region:  # a box between token centres: refused before any weights load
        box_weights(box, gen.token_grid(base_cfg))
    reference = read_reference(args, size)
    image = read_first_frame(args.image, base_cfg, size)

    pipe = load_pipeline(args)
    for path, concept, alpha, beta in concepts:
        print(add_concept_file(pipe, path, concept, identity=alpha, motion=beta))
    gen = dataclasses.replace(gen, regions=dict(zip(pipe.concepts, args.region, strict=False)))
    check_prompt_tokens(pipe, args.prompt)
    warn_unreadable("generate", pipe.tokenizer.unreadable_words(args.prompt))
    experts = "" if g.low_noise_guidance is None else \
        f" (high-noise expert; low-noise expert below t {base_cfg.boundary:g} at {g.low_noise_guidance:g})"
    print(f"sampling {frames}x{size[0]}x{size[1]}: {g.steps} steps, guidance {g.guidance:g}{experts}, "
          f"shift {g.shift:g}, self-cond {'on' if g.self_cond else 'off'}, seed {g.seed}")
    video = generate(pipe, args.prompt, gen, progress=args.progress, image=image)  # (3, T, H, W)

    out = Path(args.out)
    label = f"seed {args.seed}: {args.prompt}" if args.contact_sheet else None
    fps = args.fps or base_cfg.default_fps
    written = write_video_files(out, video, fps, sheet_label=label, reference=reference)
    if wants_scores(args):
        scorers = load_scorers(args, str(pipe.device), base_cfg)
        ref = None if reference is None else reference[:, :frames]
        written.append(write_scores(out.with_suffix(".metrics.json"), video, ref, args.prompt, scorers))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
