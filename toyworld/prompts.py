"""The toy world's prompts, in its own caption grammar: a concept's stage-1 and stage-2 texts with [v]
in the colour slot and [u] in the motion slot, its edits, and the base's prior and companion prompts
("STATIC | FULL")."""

from __future__ import annotations

import numpy as np

from toyworld.concepts import ConceptSpec as ToyConcept
from toyworld.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, caption_of

EXTRA = ("red", "square", "up")  # the ordinary object the demo's second edit adds


def static_prompt(spec: ToyConcept, background: str | None = None) -> str:
    return f"a [v] {spec.shape} on a {background or spec.background} background"


def full_prompt(
    spec: ToyConcept, background: str | None = None, extra: tuple[str, str, str] | None = None
) -> str:
    """The world's caption with [v] in the colour slot and [u] in the motion: 'a [v] square moves [u]
    on a gray background'; `extra` adds an ordinary object as two-object captions do."""
    subject = f"a [v] {spec.shape} moves [u]"
    bg = background or spec.background
    if extra is None:
        return f"{subject} on a {bg} background"
    return f"{subject} and {caption_of(bg, [extra])}"


def edit_background(spec: ToyConcept) -> str:
    """Another background for the edit: blue unless the concept's own is blue."""
    return "blue" if spec.background != "blue" else "green"


def moving_object(rng: np.random.Generator, colours: list[str]) -> tuple[str, str, str]:
    colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
    return colour, shape, MOTIONS[1 + rng.integers(len(MOTIONS) - 1)]


def toy_prior_prompts(n: int = 8, seed: int = 0, pairs: int = 0) -> tuple[str, ...]:
    """Two-part prior prompts in the world's own captions, 'a red circle on a blue background | a red
    circle moves left on a blue background': every background, varied objects and motions. The last
    `pairs` prompts have two objects of different colours ('a red circle and a blue square on ... |
    a red circle moves left and a blue square moves up on ...'), as the world's two-object scenes."""
    rng = np.random.default_rng(seed)
    bgs, cols = list(BACKGROUNDS), list(COLOURS)
    out = []
    for i in range(n):
        bg = bgs[i % len(bgs)]
        objs = [moving_object(rng, cols)]
        if i >= n - pairs:
            objs.append(moving_object(rng, [c for c in cols if c != objs[0][0]]))
        static = " and ".join(f"a {c} {s}" for c, s, _ in objs)
        out.append(f"{static} on a {bg} background | {caption_of(bg, objs)}")
    return tuple(out)


def toy_companion_prompts(spec: ToyConcept, n: int, seed: int = 1, exclude: tuple[str, ...] = (EXTRA[0],)
                          ) -> tuple[str, ...]:
    """n ordinary objects on the concept's background, "STATIC | FULL" ('a cyan circle on a black
    background | a cyan circle moves left on a black background'): every colour not in `exclude` in turn
    (by default the edit's red: the edit must not be what the concept trained beside), shape and motion
    drawn."""
    rng = np.random.default_rng(seed)
    cols = [c for c in COLOURS if c not in exclude]
    objs = [(cols[i % len(cols)], *moving_object(rng, cols)[1:]) for i in range(n)]
    bg = spec.background
    return tuple(f"a {c} {s} on a {bg} background | {caption_of(bg, [(c, s, m)])}" for c, s, m in objs)


def toy_captions(pairs: int = 500) -> list[str]:
    """Every one-object caption of the vocabulary and a sample of two-object ones (a tokenizer for a
    random base is trained on them)."""
    objs = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    out = [caption_of(bg, [o]) for bg in BACKGROUNDS for o in objs]
    rng = np.random.default_rng(0)
    for _ in range(pairs):
        a, b = (objs[i] for i in rng.integers(0, len(objs), 2))
        out.append(caption_of(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], [a, b]))
    return out


__all__ = ["EXTRA", "static_prompt", "full_prompt", "edit_background", "moving_object", "toy_prior_prompts",
           "toy_companion_prompts", "toy_captions"]
