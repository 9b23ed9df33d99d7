"""The compose bench's measures, from pixels: each half of a two-concept video against both concepts'
references (identity, leakage, motion; toyworld/compose.py lists them), and a concept generated alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toyworld import instruments as ins
from toyworld.world import BACKGROUNDS

MOVING_AXIS_PX = 0.5  # a reference axis whose stride-2 velocity std is below this does not count as moving


def motion_match(traj: np.ndarray, ref: np.ndarray, stride: int = 2) -> float:
    """Per-axis Pearson correlation of stride-2 velocities, averaged over the axes along which the
    reference moves (velocity std >= MOVING_AXIS_PX). Invariant to translation and to a per-axis
    scale, so an object tracing its concept's path smaller, in its half, still scores 1. A found
    object that does not move along a moving axis scores 0 there; NaN when nothing is comparable."""
    if len(traj) <= stride:
        return float("nan")
    a, b = traj[stride:] - traj[:-stride], ref[stride:] - ref[:-stride]  # (T - s, 2)
    ok = ~(np.isnan(a).any(1) | np.isnan(b).any(1))
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok], b[ok]
    out = []
    for k in range(2):
        if b[:, k].std() < MOVING_AXIS_PX:
            continue
        out.append(0.0 if a[:, k].std() < 1e-6 else float(np.corrcoef(a[:, k], b[:, k])[0, 1]))
    return float(np.mean(out)) if out else float("nan")


@dataclass
class Reference:
    """A concept's reference clip read once: frames (T, H, W, 3) float 0..255, object mask, trajectory."""

    frames: np.ndarray
    mask: np.ndarray
    traj: np.ndarray
    hist: np.ndarray

    @classmethod
    def of(cls, video) -> Reference:
        frames = ins.as_frames(video)
        mask = ins.object_masks(frames)[0]
        return cls(frames, mask, ins.centroids(mask), ins.colour_histogram(frames, mask))


def object_scores(frames: np.ndarray, mask: np.ndarray, own: Reference, other: Reference) -> dict[str, float]:
    """One object (a mask of `frames`) against its own concept's reference and the other's."""
    from toyworld.report import crop_cosines

    def crop(ref: Reference) -> float:
        cos = crop_cosines(frames, mask, ref.frames, ref.mask)
        return float(np.nanmean(cos)) if np.any(~np.isnan(cos)) else 0.0  # never found: 0, as bench

    hist = ins.colour_histogram(frames, mask)
    out = {
        "id_crop": crop(own),
        "id_crop_other": crop(other),
        "id_colour": ins.appearance_similarity(hist, own.hist),
        "id_colour_other": ins.appearance_similarity(hist, other.hist),
        "motion": motion_match(ins.centroids(mask), own.traj),
        "detection": ins.detection_rate(ins.centroids(mask)),
    }
    out["crop_margin"] = out["id_crop"] - out["id_crop_other"]
    out["colour_margin"] = out["id_colour"] - out["id_colour_other"]
    return out


def score_composition(video, ref_a: Reference, ref_b: Reference, swapped: bool = False,
                      background: str | None = None) -> dict[str, float]:
    """A two-concept video: the left half's object against A (own) and B (other), the right half's
    against B (own) and A (other); swapped (B asked for on the left): A is read in the right half.
    Keys 'a_*' (concept A's half), 'b_*' (B's), 'sides_right'; with the `background` asked for,
    'background_right' (the world's background colour nearest the video's is that one)."""
    frames = np.clip(np.round(ins.as_frames(video)), 0, 255)
    bg = ins.background_colour(frames)
    left, right = ins.object_masks(frames, 2, bg)
    if swapped:
        left, right = right, left
    out = {f"a_{k}": v for k, v in object_scores(frames, left, ref_a, ref_b).items()}
    out.update({f"b_{k}": v for k, v in object_scores(frames, right, ref_b, ref_a).items()})
    out["sides_right"] = float(out["a_crop_margin"] > 0 and out["b_crop_margin"] > 0)
    if background is not None:
        out["background_right"] = float(ins.nearest_name(bg, BACKGROUNDS) == background)
    return out


def score_alone(video, own: Reference, other: Reference) -> dict[str, float]:
    """One concept generated alone: its object against its own and the other concept's reference,
    and the frame-by-frame MSE to its own reference (beside the flat-video floor)."""
    frames = np.clip(np.round(ins.as_frames(video)), 0, 255)
    out = object_scores(frames, ins.object_masks(frames)[0], own, other)
    out["mse"] = float(np.mean((frames / 127.5 - own.frames / 127.5) ** 2))
    out["mse_floor"] = ins.flat_video_mse(own.frames.astype(np.uint8))
    return out


__all__ = ["Reference", "motion_match", "object_scores", "score_alone", "score_composition"]
