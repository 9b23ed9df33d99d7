"""The metric flags of `setseq generate` (--reference, --clip, --arcface, --face-box): checked before
any weights load, scorers built from the user's local weights, scores written beside the video.
Not a command: wiring that joins weights/ (loaders), sample/ (scorers) and toyworld/ (the tiny base's
object instruments)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.config import ModelConfig
from setseq.args import parse_box


def check_scorer_args(args: argparse.Namespace) -> None:
    """Bad --reference / --clip / --arcface / --face-box: an error before any weights load."""
    if args.reference is not None and not Path(args.reference).is_file():
        raise FileNotFoundError(f"--reference {args.reference!r}: no such video")
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


def wants_scores(args: argparse.Namespace) -> bool:
    return args.reference is not None or args.clip is not None


def load_scorers(args: argparse.Namespace, device: str, base_cfg: ModelConfig) -> dict:
    """score_video's scorers: CLIP-T and ArcFace when their weights were given, the toy world's object
    instruments on the tiny base (they assume its flat scenes)."""
    scorers = {}
    if args.clip is not None:
        from sample.clip import ClipTextScorer
        from weights.clip import load_clip

        scorers["clip_scorer"] = ClipTextScorer(*load_clip(args.clip, device=device))
    if args.arcface is not None:
        from sample.arcface import ArcFaceScorer
        from weights.arcface import load_arcface

        model = load_arcface(args.arcface, device=device)
        scorers["face_scorer"] = ArcFaceScorer(model, box=parse_box(args.face_box))
    if base_cfg.name == "tiny":
        from toyworld.metrics import object_scores

        scorers["object_scorer"] = object_scores
    return scorers


def write_scores(path: Path, video, reference, prompt: str, scorers: dict) -> Path:
    """PATH (.metrics.json) with every metric the inputs allow; prints the headline ones."""
    from sample.metrics import NOT_AVAILABLE, score_video, to_json

    scores = score_video(video, reference, prompt=prompt, **scorers)
    path.write_text(to_json(scores) + "\n")
    shown = ("mse", "id", "motion_fidelity", "temporal_coherence", "clip_t", "arcface")
    print(json.dumps({k: v for k, v in scores.items() if k in shown and v != NOT_AVAILABLE}))
    return path


def read_reference(args: argparse.Namespace, size: tuple[int, int]):
    """The --reference video (3, T, H, W), or None: read before sampling, so a bad one costs nothing."""
    if args.reference is None:
        return None
    from train.video import read_video

    return read_video(args.reference, frames=None, size=size)
