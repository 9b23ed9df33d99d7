"""Not a timing: what a personalized toy concept looks like on each background. For every background of
the world, the concept's training prompt with that background, sampled with the adapter on and off
(identity = motion = 0: the base with the trained tokens), and the sprite's colours read from pixels:
its mean, and the mean of its pixels nearer each of the concept's two colours.

On the concepts `setseq demo` trains (its defaults, seed 0), two generations each: `ours` keeps the
stripes on black, shifts them on blue (lime (182, 192, 81), purple (111, 99, 150); the reference
(150, 230, 60), (120, 40, 180)) and draws a magenta blob on gray, (203, 61, 157), near the base's own
(210, 58, 123) there; `ours_noprior` keeps them on blue ((154, 210, 95), (78, 72, 132)) and fills a gray
frame with stripes (no object found).

    setseq demo --out runs/demo
    python -m benchmarks.background_shift runs/demo/work/ours.safetensors [--concept stripes_stutter]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from toyworld import experiment as X
from toyworld import instruments as ins
from toyworld import prompts as P
from toyworld.concepts import load_concept
from toyworld.world import BACKGROUNDS, ToyWorldConfig


def sprite_colours(frames: np.ndarray, colours) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean RGB of the object's pixels, and of those nearer each concept colour (NaN where none are)."""
    pixels = frames[ins.object_masks(frames)[0]]  # (N, 3)
    if not len(pixels):
        return np.full(3, np.nan), [np.full(3, np.nan) for _ in colours]
    nearest = np.linalg.norm(pixels[:, None] - np.asarray(colours, float), axis=-1).argmin(1)
    parts = [pixels[nearest == k].mean(0) if (nearest == k).any() else np.full(3, np.nan)
             for k in range(len(colours))]
    return pixels.mean(0), parts


def found_mean(colours: list[np.ndarray]) -> np.ndarray:
    """Mean of the colours that were found (not NaN); NaN if none was."""
    found = [c for c in colours if not np.isnan(c).any()]
    return np.mean(found, 0) if found else np.full(3, np.nan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concept_file",
                    help="a toy concept file (e.g. `setseq demo`'s runs/demo/work/ours.safetensors)")
    ap.add_argument("--concept", default="stripes_stutter", help="its toy concept (name or TOML)")
    ap.add_argument("--base", default=str(X.DEFAULT_BASE))
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    spec, world, budget = load_concept(args.concept), ToyWorldConfig(), X.ToyBudget()
    base = X.ToyBase(args.base, Path(tempfile.gettempdir()))  # a folder base writes nothing there
    pipe, adapter = X.concept_pipeline(base, Path(args.concept_file))
    fmt = lambda c: "(" + ", ".join("-" if np.isnan(x) else f"{x:.0f}" for x in c) + ")"  # noqa: E731
    print(f"reference colours {', '.join(fmt(c) for c in spec.colours)}; home background {spec.background}")
    print("| background | adapter | sprite mean | nearer colour 1 | nearer colour 2 |\n|---|---|---|---|---|")
    for bg in BACKGROUNDS:
        for label, scale in (("on", 1.0), ("off", 0.0)):
            job = X.Job(bg, P.full_prompt(spec, bg), scale, scale, seeds=X.seeds(args.seeds))
            reads = [sprite_colours(np.clip(np.round(ins.as_frames(v)), 0, 255), spec.colours)
                     for v in X.generate_videos(pipe, adapter, job, world, budget)]
            mean = found_mean([r[0] for r in reads])
            parts = [found_mean([r[1][k] for r in reads]) for k in range(2)]
            print(f"| {bg} | {label} | {fmt(mean)} | {fmt(parts[0])} | {fmt(parts[1])} |")


if __name__ == "__main__":
    main()
