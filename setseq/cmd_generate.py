"""`setseq generate`: a video from a base model, concept files and a prompt.

    setseq generate --base wan-1.3b-dir --concept dancer.safetensors \\
        --prompt "A [v] man in a cap dancing on the moon. He is performing [u] dancing motion." --out moon.mp4

Writes FILE.mp4 and FILE.gif beside it (and FILE.png, a contact sheet, with --contact-sheet). Several
--concept flags mix separately trained concepts (each its own adapter, with its own tokens).
--identity / --motion scale every concept's identity and motion terms (stylization: e.g. --motion 0
keeps the look and drops the learned motion); `--concept FILE:ALPHA:BETA` sets them for one concept.
With --reference VIDEO the contact sheet shows the reference first and FILE.metrics.json holds the
pixel metrics against it (sample/metrics.py): MSE and temporal coherence for any base, the toy world's
object instruments (ID, motion fidelity) only for the tiny base, whose world they assume. The paper's
model-based columns need local weights: --clip DIR (a HF CLIP folder) adds CLIP-T of the video and the
prompt; --arcface FILE (an insightface IResNet backbone) adds ArcFace identity similarity to the
reference, read inside --face-box.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from model.config import ModelConfig, parse_size

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
    p.add_argument("--prompt", required=True,
                   help='e.g. "A [v] man in a cap on the moon. He does [u] dancing."')
    p.add_argument("--negative-prompt", default="",
                   help="the unconditional prompt of guidance (default: empty)")
    p.add_argument("--identity", type=float, default=1.0,
                   help="identity scale alpha of every concept (default 1)")
    p.add_argument("--motion", type=float, default=1.0,
                   help="motion scale beta of every concept (default 1)")
    p.add_argument("--steps", type=int,
                   help="Euler steps (default: the base model's own, ModelConfig.sample_steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (default: the base model's own, "
                        "ModelConfig.guidance, e.g. 5 for Wan 2.1, 1 (off) for tiny; the paper samples at 8)")
    p.add_argument("--shift", type=float, help="timestep shift (default: the base model's own)")
    p.add_argument("--no-self-cond", dest="self_cond", action="store_false", default=None,
                   help="do not feed back the x0 estimate (default: on when the base has self-conditioning)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same seed gives the same video)")
    p.add_argument("--random-weights", action="store_true",
                   help="randomly initialized weights for a preset --base (tests, timing; nothing learned)")
    p.add_argument("--base-seed", type=int, default=0, help="init seed of --random-weights")
    p.add_argument("--frames", type=int, help="frames, 1 + k * the VAE's time compression (default per base)")
    p.add_argument("--size", help="HxW in pixels, e.g. 480x832 (default per base)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the written files (default 8)")
    p.add_argument("--out", required=True, help="the mp4 to write; the gif (and png) go beside it")
    p.add_argument("--contact-sheet", action="store_true", help="also write FILE.png: one column per frame")
    p.add_argument("--reference", help="a video to compare with: first row of the sheet, FILE.metrics.json")
    p.add_argument("--clip", help="a local HF CLIP folder (e.g. clip-vit-large-patch14): adds CLIP-T to "
                   "FILE.metrics.json")
    p.add_argument("--arcface", help="an insightface arcface_torch IResNet backbone (.pth): adds ArcFace "
                   "identity similarity to --reference to FILE.metrics.json")
    p.add_argument("--face-box", dest="face_box", help="x0,y0,x1,y1 as fractions of the frame: where the "
                   "face is, for --arcface (no detector; default the centred square)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="base weights dtype (default: bf16 on cuda)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def parse_concept(text: str, identity: float, motion: float) -> tuple[Path, float, float]:
    """'FILE' or 'FILE:ALPHA:BETA' -> (path, alpha, beta); plain FILE takes the global scales."""
    m = _SCALES.match(text)
    if m is None or Path(text).is_file():
        return Path(text), identity, motion
    try:
        return Path(m["path"]), float(m["alpha"]), float(m["beta"])
    except ValueError:
        raise ValueError(f"--concept {text!r}: ALPHA and BETA must be numbers, e.g. dancer.safetensors:1:0.5"
                         ) from None


def shape_of(args: argparse.Namespace, base_cfg: ModelConfig) -> tuple[int, tuple[int, int]]:
    default = base_cfg.default_clip
    if default is None and (args.frames is None or args.size is None):
        raise ValueError(f"base {base_cfg.name!r} has no default video shape; pass --frames and --size")
    frames = args.frames if args.frames is not None else default[0]
    size = parse_size(args.size) if args.size is not None else default[1:]
    return frames, size


def check_out(path: Path) -> None:
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {str(path)!r} must name an .mp4 file "
                         "(the .gif and .png are written beside it)")


def load_pipeline(args: argparse.Namespace):
    from sample.generate import Pipeline
    from weights.base import load_base

    return Pipeline.of(load_base(args.base, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                                 random_weights=args.random_weights, seed=args.base_seed))


def apply_concepts(pipe, args: argparse.Namespace) -> list[str]:
    from lora.concept import load_concept
    from sample.generate import add_concept

    lines = []
    for text in args.concept:
        path, alpha, beta = parse_concept(text, args.identity, args.motion)
        try:
            concept = load_concept(path)
            adapter = add_concept(pipe, concept, identity=alpha, motion=beta)
        except FileNotFoundError:
            raise FileNotFoundError(f"--concept {str(path)!r}: no such concept file") from None
        except ValueError as err:
            raise ValueError(f"--concept {str(path)!r}: {err}") from None
        tokens = " ".join(concept.tokens) or "no tokens"
        lines.append(f"concept {adapter} ({path}): rank {concept.rank}, {len(concept.modules)} layers, "
                     f"{tokens}, identity {alpha:g}, motion {beta:g}")
    return lines


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--face-box {text!r}: give x0,y0,x1,y1 as fractions of the frame, "
                         "e.g. 0.3,0.1,0.7,0.5")
    from sample.arcface import check_box

    return check_box(box)


def check_scorer_args(args: argparse.Namespace) -> None:
    """Bad --clip / --arcface / --face-box: an error before any weights load."""
    if args.clip is not None:
        from weights.clip import check_folder

        check_folder(args.clip)
    if args.arcface is not None:
        if args.reference is None:
            raise ValueError("--arcface compares faces with the reference video: pass --reference too")
        if not Path(args.arcface).is_file():
            raise FileNotFoundError(f"--arcface {args.arcface!r}: no such file (an insightface "
                                    "arcface_torch backbone, e.g. backbone.pth)")
    if args.face_box is not None and args.arcface is None:
        raise ValueError("--face-box only applies to --arcface")
    parse_box(args.face_box)


def load_scorers(args: argparse.Namespace, device: str):
    """(CLIP-T scorer, ArcFace scorer), each None when its weights were not given."""
    clip_scorer = face_scorer = None
    if args.clip is not None:
        from sample.clip import ClipTextScorer
        from weights.clip import load_clip

        clip_scorer = ClipTextScorer(*load_clip(args.clip, device=device))
    if args.arcface is not None:
        from sample.arcface import ArcFaceScorer
        from weights.arcface import load_arcface

        face_scorer = ArcFaceScorer(load_arcface(args.arcface, device=device), box=parse_box(args.face_box))
    return clip_scorer, face_scorer


def run(args: argparse.Namespace) -> int:
    from sample import media
    from sample.generate import GenerateConfig, check_prompt_tokens, generate

    out = Path(args.out)
    check_out(out)
    for text in args.concept:  # fail on a missing file before loading any weights
        path = parse_concept(text, args.identity, args.motion)[0]
        if not path.is_file():
            raise FileNotFoundError(f"--concept {str(path)!r}: no such concept file")
    if args.reference is not None and not Path(args.reference).is_file():
        raise FileNotFoundError(f"--reference {args.reference!r}: no such video")
    check_scorer_args(args)
    from weights.base import base_config

    base_cfg = base_config(args.base, args.random_weights)  # a preset without weights: refused here
    frames, size = shape_of(args, base_cfg)
    base_cfg.latent_shape(frames, size)  # bad --frames / --size: an error before any weights load
    gen = GenerateConfig(frames=frames, size=size, steps=args.steps, guidance=args.guidance, shift=args.shift,
                         seed=args.seed, negative_prompt=args.negative_prompt, self_cond=args.self_cond)
    g = gen.resolved(base_cfg)  # bad --steps / --guidance: an error before any weights load

    pipe = load_pipeline(args)
    for line in apply_concepts(pipe, args):
        print(line)
    check_prompt_tokens(pipe, args.prompt)
    print(f"sampling {frames}x{size[0]}x{size[1]}: {g.steps} steps, guidance {g.guidance:g}, "
          f"shift {g.shift:g}, self-cond {'on' if g.self_cond else 'off'}, seed {g.seed}")
    video = generate(pipe, args.prompt, gen, progress=args.progress)  # (3, T, H, W)

    written = [media.write_mp4(out, video, args.fps),
               media.write_gif(out.with_suffix(".gif"), video, args.fps)]
    reference = None
    if args.reference is not None:
        from train.video import read_video

        reference = read_video(args.reference, frames=None, size=size)
    if args.contact_sheet:
        rows, labels = [video], [f"seed {args.seed}: {args.prompt}"]
        if reference is not None:
            rows, labels = [reference, video], ["reference", *labels]
        written.append(media.write_contact_sheet(out.with_suffix(".png"), rows, labels))
    if reference is not None or args.clip is not None:
        from sample.metrics import NOT_AVAILABLE, score_video, to_json

        clip_scorer, face_scorer = load_scorers(args, str(pipe.device))
        object_scorer = None
        if base_cfg.name == "tiny":  # the object instruments assume the toy world's flat scenes
            from toyworld.metrics import object_scores as object_scorer
        scores = score_video(video, None if reference is None else reference[:, :frames], prompt=args.prompt,
                             clip_scorer=clip_scorer, face_scorer=face_scorer, object_scorer=object_scorer)
        metrics_path = out.with_suffix(".metrics.json")
        metrics_path.write_text(to_json(scores) + "\n")
        written.append(metrics_path)
        shown = ("mse", "id", "motion_fidelity", "temporal_coherence", "clip_t", "arcface")
        print(json.dumps({k: v for k, v in scores.items() if k in shown and v != NOT_AVAILABLE}))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
