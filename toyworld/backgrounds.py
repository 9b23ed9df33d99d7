"""A concept's own clip on other backgrounds: its flat background keyed out and repainted. Built from
the user's video alone (the toy world paints flat backgrounds, so its most frequent colour is the
background; a real clip would need a segmentation mask), so the concept's tokens see their object on
several backgrounds and stop binding its colours to one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toyworld.concepts import ConceptSpec as ToyConcept
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


def repainted_clips(spec: ToyConcept, video: Path, folder: Path, n: int, unseen: tuple[str, ...]
                    ) -> list[tuple[str, Path]]:
    """(background, video) of every clip a concept trains on: its own and, n > 0, the clip repainted
    onto n other backgrounds, never one in `unseen`, written into FOLDER."""
    if not n:
        return [(spec.background, video)]
    from toyworld.experiment import write_lossless  # the training input's format
    from train.video import read_frames

    frames = read_frames(video)[0]
    # The clip itself stays half of the concept's items (listed once per repaint): at a quarter,
    # checker_hop_green's reconstruction lost its worst-frame goal (docs/results.md).
    clips = [(spec.background, video)] * n
    for bg in other_backgrounds(spec.background, n, unseen=unseen):
        clips.append((bg, write_lossless(folder / f"{video.stem}-on-{bg}.mp4",
                                          on_background(frames, BACKGROUNDS[bg]))))
    return clips


__all__ = ["background_colour", "on_background", "other_backgrounds", "repainted_clips"]
