"""`setseq demo`: the whole method end to end on the toy world, on a CPU, in minutes (toyworld/demo.py).

    setseq demo                          # the committed tiny base (assets/tiny), concept stripes_stutter
    setseq demo --concept checker_eight --out runs/demo-checker
    setseq demo --quick --base tiny      # a seconds-long smoke run on a random base (numbers meaningless)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from setseq.args import positive_float
from toyworld import demo

# flags that set ToyBudget fields
BUDGET_FLAGS = ("samples", "steps1", "steps2", "prior_pairs", "companions", "backgrounds", "frame_time_shift")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole method on the toy world: personalize, edit, stylize, measure",
        description="Personalize a held-out toy-world concept on the tiny base (both stages), generate "
        "reconstruction, two edits and stylizations, and write videos, a contact sheet and a "
        "report of pixel metrics beside their floors.",
    )
    p.add_argument(
        "--base",
        help="base model folder or preset (default: the committed assets/tiny; tiny-conv: the committed "
        "conv-VAE base; with --quick a preset name is random weights, and no --base the committed tiny "
        "when present)",
    )
    p.add_argument(
        "--concept",
        default=demo.DEFAULT_CONCEPT,
        help="held-out concept: a name in examples/concepts/ or a TOML file "
        f"(default {demo.DEFAULT_CONCEPT})",
    )
    p.add_argument("--out", default="runs/demo", help="results folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, one seed (seconds)")
    p.add_argument("--samples", type=int, help="seeds per prompt (default 4; quick 1)")
    p.add_argument("--steps1", type=int, help="stage-1 steps (default 600)")
    p.add_argument("--steps2", type=int, help="stage-2 steps (default 1200)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--prior-pairs", dest="prior_pairs", type=int,
                   help="how many of the 8 prior-preservation prompts have two objects (default 0)")
    p.add_argument("--companions", type=int,
                   help="ordinary objects the base generates to stitch beside the concept, in the toy base's "
                   "two-object layout (default 0; never red, the edit's colour)")
    p.add_argument("--backgrounds", type=int,
                   help="also train on the concept's clip repainted onto this many other backgrounds (its "
                   "flat background keyed out; never the edit's colour; default 3, 0 for the clip alone)")
    p.add_argument("--frame-time-shift", dest="frame_time_shift", type=positive_float,
                   help="training-time shift of stage 1's single frames (default: the tiny recipe's)")
    p.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="skip the run without prior preservation"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: personalization then trains under "
                   "bf16 autocast (train/personalize.py), sampling stays fp32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> demo.DemoSettings:
    budget = {k: getattr(args, k) for k in BUDGET_FLAGS if getattr(args, k) is not None}
    return demo.DemoSettings(base=args.base, concept=args.concept, out=Path(args.out), quick=args.quick,
                             budget=budget, seed=args.seed, ablation=args.ablation, device=args.device,
                             progress=args.progress)


def run(args: argparse.Namespace) -> int:
    print(demo.summary(demo.run(settings_of(args))))
    return 0
