"""`setseq bench toyworld`: the paper's Tables 1 and 2 at toy scale, in one command;
`setseq bench compose`: composition of two dynamic concepts (joint+stitch, joint, post-hoc mixing).

    setseq bench toyworld                        # 3 held-out concepts x 2 seeds x 5 variants
    setseq bench toyworld --concepts 1 --seeds 1 --variants ours,dblora --samples 2
    setseq bench toyworld --quick --base tiny    # smoke run on a random base
    setseq bench compose                         # checker_eight + split_hop_spin, both orders, 1 seed
    setseq bench compose --pair stripes_stutter,checker_eight --seeds 2 --out runs/compose-sc
    setseq bench compose --pair all --seeds 2    # the protocol: every shipped pair, pooled goals
    setseq bench compose --quick --base tiny     # smoke run on a random base

What the rows, columns and floors are: toyworld/bench.py and toyworld/compose.py. Each finished run is
saved in OUT/runs/, so a rerun skips it (--fresh redoes all). compose's default budget, `ours` at
300 + 1200 steps per concept (joint runs 600 + 2400) and 4 generations per prompt and order, takes
about 25 minutes a seed on 2 cores; --quick takes about 15 s.
OUT: toyworld bench.md, bench.json; compose compose.md, compose.json, compose.png; runs/ and work/.
"""

from __future__ import annotations

import argparse

from setseq.args import guidance_scale, nonnegative_float, positive_float
from toyworld import bench
from toyworld import experiment as X

BUDGET_FLAGS = (  # flags that set ToyBudget fields
    "samples", "steps1", "steps2", "rank", "lr", "prior_weight", "prior_pairs", "companions", "backgrounds",
    "guidance", "sample_steps", "frame_time_shift",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="reproduce Tables 1-2 at toy scale (toyworld) or measure composition of two concepts (compose)",
        description="toyworld: personalize held-out toy-world concepts with each variant (LoRA-1, DB-LoRA, "
        "two-stage, ours, textual inversion), generate reconstructions and background edits, and tabulate "
        "pixel metrics as mean ± spread with their floors. compose: put two held-out concepts in one video "
        "(joint training with and without stitched pairs, post-hoc mixing) and measure each half's identity, "
        "leakage and motion.",
    )
    p.add_argument("suite", choices=("toyworld", "compose"), help="which benchmark (toyworld, compose)")
    p.add_argument("--base", help="base model folder or preset (default: assets/tiny; tiny, tiny-conv: the "
                   "committed weights; with --quick a preset name is random weights)")
    p.add_argument(
        "--concepts",
        default="3",
        help="held-out concepts: how many from examples/concepts (alphabetical), or comma-separated names "
        "(default 3)",
    )
    p.add_argument("--pair", help="compose: two concepts A,B (names or TOML files; default the first two "
                   "of examples/concepts); several 'A,B;C,D' or 'all' (every pair of the shipped concepts) "
                   "run each into OUT/A+B/ and pool the goals in OUT/compose-all.md")
    p.add_argument("--seeds", type=int, help="training seeds per concept (default: toyworld 2, compose 1)")
    p.add_argument("--variants", help=f"comma-separated rows (default {','.join(X.variants(X.ToyBudget()))}; "
                   f"also {','.join(X.extra_variants(X.ToyBudget()))}); compose: methods (default "
                   "joint+stitch,joint,post-hoc; also joint+stitch-sbs, joint+stitch-squeeze, "
                   "joint+stitch-scale, joint+stitch-pNN: stitched pairs on NN%% of the steps, "
                   "post-hoc+regions: each single run confined to its half, ROW+stitch: the joint "
                   "default trained as another row, e.g. dblora+stitch, twostage+stitch)")
    p.add_argument("--samples", type=int, help="generations per prompt (default 4; quick 1)")
    p.add_argument(
        "--steps1", type=int, help="stage-1 steps (default 600, compose 300 per concept; single-stage rows "
        "get steps1 + steps2)"
    )
    p.add_argument("--steps2", type=int, help="stage-2 steps (default 1200, compose 1200 per concept)")
    p.add_argument("--rank", type=int, help="LoRA rank of every LoRA row but LoRA-1 (default 16; a joint "
                   "compose run takes it per concept)")
    p.add_argument("--lr", type=positive_float, help="LoRA learning rate of every row (default 1e-3)")
    p.add_argument("--prior-weight", dest="prior_weight", type=nonnegative_float,
                   help="weight of the prior-preservation loss beside the concept's (default 0.25)")
    p.add_argument("--prior-pairs", dest="prior_pairs", type=int,
                   help="how many of the 8 prior-preservation prompts have two objects (default 0)")
    p.add_argument("--companions", type=int,
                   help="ordinary objects the base generates to stitch beside each concept (default 0)")
    p.add_argument("--backgrounds", type=int,
                   help="also train each concept on its clip repainted onto this many other backgrounds "
                   "(never the edit's colour, nor compose's new scene; default 3, 0 for the clip alone)")
    p.add_argument("--frame-time-shift", dest="frame_time_shift", type=positive_float,
                   help="training-time shift of stage 1's single frames (default: the tiny recipe's)")
    p.add_argument("--guidance", type=guidance_scale,
                   help="sampling guidance (default 1: personalized tiny concepts measured better than at 3, "
                   "the tiny base's default before; compose 2: compositions keep the asked-for scene); "
                   "a rerun that changes only --guidance, --sample-steps or --samples reuses the trained "
                   "concepts")
    p.add_argument("--sample-steps", dest="sample_steps", type=int,
                   help="Euler steps per generation (default: the base model's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, one sample (seconds a run)")
    p.add_argument("--out", help="results folder (default runs/bench; compose runs/bench-compose)")
    p.add_argument("--fresh", action="store_true", help="redo runs already saved in OUT/runs/")
    p.add_argument(
        "--shard",
        help="I/N: run only every N-th run starting at I (0-based), e.g. two processes "
        "0/2 and 1/2 on two cores; a final run without --shard tabulates them all",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: tabulate the runs already saved in OUT/runs/ (an interrupted bench)",
    )
    p.add_argument("--clip", help="toyworld: a local HF CLIP folder; adds the paper's C-T column (CLIP-T of "
                   "the background edits and their prompt; without it the column says not available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def budget_overrides(args: argparse.Namespace) -> dict:
    """The budget fields given on the command line."""
    return {k: getattr(args, k) for k in BUDGET_FLAGS if getattr(args, k) is not None}


def settings_of(args: argparse.Namespace) -> bench.BenchSettings:
    return bench.BenchSettings(
        suite=args.suite, base=args.base, concepts=args.concepts, pair=args.pair, seeds=args.seeds,
        variants=args.variants, budget=budget_overrides(args), quick=args.quick, out=args.out,
        fresh=args.fresh, shard=args.shard, table_only=args.table_only, clip=args.clip,
        progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    print(bench.summary(bench.run(settings_of(args))))
    return 0
