"""Not a timing: does a tiny base put each colour on the side its caption says? Samples held-out captions
as `setseq pretrain`'s report does and reads the object colours from pixels, one-object clips and the
objects of two-object scenes apart (the caption's first object is the left one, so a scene drawn with
its sides swapped gets both wrong).

    python -m benchmarks.colour_binding --base assets/tiny --world-seed 777 --two-object-prob 1
"""

from __future__ import annotations

import argparse

import torch

from toyworld.evaluate import heldout_report
from toyworld.world import ToyWorldConfig
from weights.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="assets/tiny", help="a tiny base folder")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--world-seed", type=int, default=12345, help="12345: setseq pretrain's own set")
    parser.add_argument("--two-object-prob", type=float, default=0.3, help="0.3: the training world's")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_checkpoint(args.base)
    world = ToyWorldConfig(two_object_prob=args.two_object_prob)
    with torch.no_grad():
        report, _, _ = heldout_report(base, world, args.world_seed, args.seed, args.prompts,
                                      base.cfg.sample_steps, [args.guidance])
    row = report["guidance"][str(args.guidance)]
    colour, pairs = row["colour"], row["pair_colour"]
    singles = colour["n"] - pairs["n"]  # every object of a one-object clip is in colour, not in pair_colour
    pair_hits = round(pairs["accuracy"] * pairs["n"]) if pairs["n"] else 0
    print(f"{args.base}: {args.prompts} held-out prompts, world seed {args.world_seed}, "
          f"guidance {args.guidance}")
    print("| clips | objects | colour right | chance (uniform) |\n|---|---|---|---|")
    if singles:
        hits = round(colour["accuracy"] * colour["n"]) - pair_hits
        print(f"| one-object | {singles} | {hits / singles:.2f} | {colour['uniform']:.2f} |")
    if pairs["n"]:  # a scene drawn with its sides swapped scores 0 here, one drawn at random 0.5
        print(f"| two-object | {pairs['n']} | {pairs['accuracy']:.2f} | {pairs['uniform']:.2f} "
              "(sides at random: 0.50) |")


if __name__ == "__main__":
    main()
