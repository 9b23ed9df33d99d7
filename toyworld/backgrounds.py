"""A concept's own clip on other backgrounds: its flat background keyed out and repainted. Built from
the user's video alone (the toy world paints flat backgrounds, so its most frequent colour is the
background; a real clip would need a segmentation mask), so the concept's tokens see their object on
several backgrounds and stop binding its colours to one."""

from __future__ import annotations

import numpy as np

from toyworld.world import BACKGROUNDS


def background_colour(video: np.ndarray) -> np.ndarray:
    """The most frequent colour of a (T, H, W, 3) uint8 clip: its flat background."""
    colours, counts = np.unique(video.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def on_background(video: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """The clip with every pixel of its background colour repainted `rgb` (the object's pixels kept)."""
    keyed = (video == background_colour(video)).all(-1)
    out = video.copy()
    out[keyed] = np.asarray(rgb, np.uint8)
    return out


def other_backgrounds(own: str, n: int, unseen: tuple[str, ...] = ()) -> list[str]:
    """The first `n` of the world's backgrounds other than the clip's own and those kept `unseen` (the
    ones an edit will ask for, so the edit stays a test of something the concept never saw)."""
    names = [b for b in BACKGROUNDS if b != own and b not in unseen]
    if n > len(names):
        raise ValueError(f"backgrounds {n}: only {len(names)} other backgrounds ({', '.join(names)}) remain "
                         f"beside '{own}' and the edits' {', '.join(unseen) or 'none'}")
    return names[:n]


__all__ = ["background_colour", "on_background", "other_backgrounds"]
