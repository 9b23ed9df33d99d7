"""Regional concepts: each concept's adapters act only on the video tokens of its part of the frame.

Concepts mixed in one video add their weight deltas to every token, so a concept's look spreads to
every object in the scene (the leak). Within `regions(model, weights)`, concept c's adapter output on
video token i is multiplied by weights[c][i] in [0, 1] (Mix-of-Show's regional sampling, applied to
the LoRA outputs): the concept changes only its region, the rest of the frame is the base's (or
another concept's). Layers that read the text (cross-attention k and v) keep their whole adapter:
their input has no place in the frame. Given where each concept's words sit in the prompt (the caller's
choice; sample/generate.py takes the span from its first token to its last, "[v] square moves [u]"),
they are confined too: a video token outside the region may not read them in cross-attention
(regional prompting). Self-attention still mixes the tokens, so the base sees the
concept everywhere; only what the adapters write, and who reads its words, is confined.

A region is a box (x0, y0, x1, y1) in fractions of the frame's width and height, the same in every
frame; a token belongs to it when its patch centre does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lora.inject import concept_names, lora_layers

# LoRA layers whose input is the text context, not video tokens (Wan's names).
TEXT_INPUT = re.compile(r"(^|\.)cross_attn\.(k|v)$")


def check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A box in fractions of the frame (a region here, the face box of sample/arcface.py): (x0, y0, x1, y1)
    with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, or a ValueError saying so."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers x0,y0,x1,y1 (left, top, right, bottom as fractions of the "
                         f"frame), got {box!r}") from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the frame: need "
                         "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, e.g. 0,0,0.5,1 for the left half")
    return x0, y0, x1, y1


def box_weights(box: Sequence[float], grid: tuple[int, int, int]) -> Tensor:
    """(L,) float32, 1 on the tokens of the (T', H', W') grid whose patch centre lies in the box, else 0;
    tokens in the DiT's (t, h, w) row-major order."""
    x0, y0, x1, y1 = check_box(box)
    t, h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]  # (H', W')
    if not inside.any():
        raise ValueError(f"region {x0:g},{y0:g},{x1:g},{y1:g} holds no token centre of the {h}x{w} "
                         "token grid; make it larger")
    return inside.expand(t, h, w).reshape(-1).float()


def word_mask(weights: Mapping[str, Tensor], positions: Mapping[str, Tensor]) -> Tensor:
    """(L, N) bool: video token i may read text token j unless j is a word of a concept whose region
    weight at i is 0. positions: concept -> (N,) bool, where its tokens sit in the prompt."""
    (n,) = {p.shape[0] for p in positions.values()}
    (length,) = {w.shape[0] for w in weights.values()}
    device = next(iter(weights.values())).device  # where the weights are, so the mask is used in place
    allowed = torch.ones(length, n, dtype=torch.bool, device=device)
    for concept, pos in positions.items():
        allowed &= ~((weights[concept] <= 0)[:, None] & pos.bool().to(device)[None, :])
    return allowed


@contextmanager
def regions(model: nn.Module, weights: Mapping[str, Tensor],
            positions: Mapping[str, Tensor] | None = None) -> Iterator[None]:
    """Confine each named concept's adapters to its token weights (L,) while the block runs, and, with
    `positions` (concept -> (N,) bool: its words in the prompt), its words to the video tokens of its
    region (word_mask); concepts not named act everywhere, as outside the block."""
    held = concept_names(model)
    unknown = sorted(set(weights) - set(held))
    if unknown:
        raise ValueError(f"regions name concept(s) {unknown} the model does not hold; it holds {held}")
    layers = [layer for name, layer in lora_layers(model).items() if not TEXT_INPUT.search(name)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot confine concepts to regions while the LoRA is merged; "
                           "call unmerge_lora() first")
    readers = [m for name, m in model.named_modules() if name.endswith("cross_attn")]
    confined = {c: positions[c] for c in weights if positions and c in positions}
    mask = word_mask(weights, confined) if confined else None
    mask = None if mask is None or bool(mask.all()) else mask  # nothing confined: the plain kernel
    for layer in layers:
        layer.regions = {c: w for c, w in weights.items() if c in layer.adapters} or None
    for attn in readers:
        attn.key_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.regions = None
        for attn in readers:
            attn.key_mask = None


__all__ = ["TEXT_INPUT", "check_box", "box_weights", "word_mask", "regions"]
