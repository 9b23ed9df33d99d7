"""Metrics of a generated video, read from pixels with sample/instruments.py, each beside its floor.

    mse                 to the reference (the concept's clip), [-1, 1] scale; floor: a flat video
                        of the reference's background (`mse_floor`)
    temporal_coherence  consecutive-frame cosine after removing the mean frame (1 = smooth);
                        beside the reference's own (`reference_coherence`)
    id                  appearance similarity of the object: colour-histogram intersection in [0, 1];
                        `id_crop` is the cosine of aligned object crops (pattern and orientation)
    motion_fidelity     trajectory agreement with the reference: velocity correlation (floor 0),
                        and `trajectory_error` (px) beside `centre_floor` (always guessing the centre)
    edit_adherence      the fraction of the attributes an edit asked for (background, colour, shape,
                        motion) that the video shows, per attribute in `edit`
    clip_t, arcface     only with a scorer the caller supplies, built from the user's local weights
                        (sample/clip.ClipTextScorer, sample/arcface.ArcFaceScorer); otherwise the
                        value is NOT_AVAILABLE, never a made-up number.

Inputs are videos as instruments.as_frames takes them: (T, H, W, 3) uint8 or (3, T, H, W) in [-1, 1].
The toy world's palettes are passed in (sample/ does not import train/).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sample import instruments as ins

NOT_AVAILABLE = "not available"
# A user-supplied scorer: (frames (T, H, W, 3) uint8, text or reference frames) -> float.
Scorer = Callable[..., float]
EDIT_KEYS = ("background", "colour", "shape", "motion")


def _frames(video) -> np.ndarray:
    """float32 (T, H, W, 3) in [0, 255]."""
    return ins.as_frames(video)


def _uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def reconstruction_mse(video, reference) -> dict[str, float]:
    a, ref = _frames(video), _frames(reference)
    if a.shape != ref.shape:
        raise ValueError(f"mse needs videos of one shape; got {a.shape} and reference {ref.shape} "
                         "(generate with the reference's --frames and --size)")
    flat = np.broadcast_to(ins.background_colour(ref), ref.shape)
    return {"mse": float(np.mean((a / 127.5 - ref / 127.5) ** 2)),
            "mse_floor": float(np.mean((flat / 127.5 - ref / 127.5) ** 2))}


def temporal_coherence(video) -> float:
    return ins.temporal_coherence(_frames(video))


def identity_similarity(video, reference) -> dict[str, float | str]:
    """ID: colour-histogram intersection of the object masks (1 = same colours); beside it the cosine of
    frame-aligned object crops (pattern and orientation; NOT_AVAILABLE when the lengths differ)."""
    a, ref = _frames(video), _frames(reference)
    mask, ref_mask = ins.object_masks(a)[0], ins.object_masks(ref)[0]
    crop = (ins.crop_similarity(ins.object_crops(a, mask), ins.object_crops(ref, ref_mask))
            if len(a) == len(ref) else NOT_AVAILABLE)
    hist, ref_hist = ins.colour_histogram(a, mask), ins.colour_histogram(ref, ref_mask)
    return {"id": ins.appearance_similarity(hist, ref_hist), "id_crop": crop}


def motion_fidelity(video, reference) -> dict[str, float]:
    """Trajectory agreement with the reference: velocity correlation (1 = same motion, 0 = unrelated),
    trajectory error (px) and its centre-guess floor, detection rate of the object."""
    a, ref = _frames(video), _frames(reference)
    if len(a) != len(ref):
        raise ValueError(f"motion fidelity compares frame by frame; the video has {len(a)} frames, "
                         f"the reference {len(ref)}")
    traj, ref_traj = ins.trajectory(a)[0], ins.trajectory(ref)[0]
    return {"motion_fidelity": ins.velocity_correlation(traj, ref_traj),
            "trajectory_error": ins.trajectory_error(traj, ref_traj),
            "centre_floor": ins.centre_guess_error(ref_traj, ref.shape[1], ref.shape[2]),
            "detection": ins.detection_rate(traj)}


def edit_adherence(video, asked: Mapping[str, str], backgrounds: Mapping[str, ins.RGB],
                   colours: Mapping[str, ins.RGB]) -> dict[str, float]:
    """What an edit asked for, e.g. {"background": "green"} or {"colour": "red", "motion": "left"}:
    `edit_adherence` = fraction present, plus `edit_<key>` (1.0 / 0.0) per asked attribute.
    Object attributes are read from the (single) object."""
    unknown = sorted(set(asked) - set(EDIT_KEYS))
    if unknown or not asked:
        raise ValueError(f"edit attributes {unknown or '{}'}: ask for one or more of {EDIT_KEYS}")
    got = ins.measure(_uint8(_frames(video)), 1, backgrounds, colours)
    obj = got["objects"][0]
    seen = {"background": got["background"], **{k: obj[k] for k in ("colour", "shape", "motion")}}
    hits = {f"edit_{k}": float(seen[k] == v) for k, v in asked.items()}
    return {"edit_adherence": float(np.mean(list(hits.values()))), **hits}


def external_score(scorer: Scorer | None, frames: np.ndarray, other) -> float | str:
    """A user-supplied model's score, or NOT_AVAILABLE when no scorer (no local weights) is given."""
    if scorer is None:
        return NOT_AVAILABLE
    value = float(scorer(frames, other))
    if not math.isfinite(value):
        raise ValueError(f"the supplied scorer returned {value}; it must return a finite number")
    return value


Palette = Mapping[str, ins.RGB]


MOTION_KEYS = ("motion_fidelity", "trajectory_error", "centre_floor", "detection")


def score_video(video, reference=None, *, prompt: str | None = None, edit: Mapping[str, str] | None = None,
                backgrounds: Palette | None = None, colours: Palette | None = None,
                clip_scorer: Scorer | None = None, face_scorer: Scorer | None = None,
                toy_world: bool = True) -> dict[str, float | str]:
    """Every metric that the inputs allow; the others are NOT_AVAILABLE. Keys: see the module doc.
    Videos are scored as the uint8 frames a person sees (a model tensor is rounded to 0..255 first).
    toy_world=False (real footage): the object instruments (ID, motion fidelity, edit adherence) assume
    one flat-coloured object on a flat background and would measure nothing, so they are NOT_AVAILABLE."""
    frames = _uint8(_frames(video))
    ref = None if reference is None else _uint8(_frames(reference))
    out: dict[str, float | str] = {"temporal_coherence": temporal_coherence(frames)}
    if ref is not None:
        out["reference_coherence"] = temporal_coherence(ref)
        if toy_world:
            out.update(identity_similarity(frames, ref))
        else:
            out.update(dict.fromkeys(("id", "id_crop"), NOT_AVAILABLE))
        if frames.shape == ref.shape:
            out.update(reconstruction_mse(frames, ref))
        else:  # a different length or size: nothing frame-by-frame to compare
            out.update(dict.fromkeys(("mse", "mse_floor"), NOT_AVAILABLE))
        if len(frames) == len(ref) and toy_world:
            out.update(motion_fidelity(frames, ref))
        else:
            out.update(dict.fromkeys(MOTION_KEYS, NOT_AVAILABLE))
    if edit:
        if not toy_world:
            raise ValueError("edit adherence reads the toy world's palettes; it needs toy_world=True")
        if backgrounds is None or colours is None:
            raise ValueError("edit adherence needs the world's palettes (backgrounds and colours)")
        out.update(edit_adherence(frames, edit, backgrounds, colours))
    out["clip_t"] = external_score(clip_scorer, frames, prompt) if prompt is not None else NOT_AVAILABLE
    out["arcface"] = external_score(face_scorer, frames, ref) if ref is not None else NOT_AVAILABLE
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Mapping[str, Mapping[str, float | str]], columns: Sequence[str] | None = None) -> str:
    """Markdown table: one row per named video, one column per metric (union of keys by default)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| video | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(c, NOT_AVAILABLE)) for c in columns) + " |")
    return "\n".join(lines)


def to_json(scores: Mapping[str, float | str]) -> str:
    """JSON with NaN written as null (JSON has no NaN)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()}
    return json.dumps(clean, indent=2)


__all__ = ["NOT_AVAILABLE", "reconstruction_mse", "temporal_coherence", "identity_similarity",
           "motion_fidelity", "edit_adherence", "score_video", "format_table", "to_json", "external_score"]
