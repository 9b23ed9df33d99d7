"""Metrics of a generated video that any base can use, each beside its floor.

    mse                 to the reference (the concept's clip), [-1, 1] scale; floor: a flat video
                        of the reference's background (`mse_floor`)
    temporal_coherence  consecutive-frame cosine after removing the mean frame (1 = smooth);
                        beside the reference's own (`reference_coherence`)
    id, id_crop,        object appearance and trajectory agreement: only with an `object_scorer` the
    motion_fidelity     caller supplies (the toy world's pixel instruments, toyworld/metrics.py, which
                        assume flat-coloured objects on a flat background); NOT_AVAILABLE otherwise
    clip_t, arcface     only with a scorer the caller supplies, built from the user's local weights
                        (sample/clip.ClipTextScorer, sample/arcface.ArcFaceScorer); otherwise the
                        value is NOT_AVAILABLE, never a made-up number.

Inputs are videos as media.as_frames takes them: (T, H, W, 3) uint8 or (3, T, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sample.media import as_frames

NOT_AVAILABLE = "not available"
# A user-supplied scorer: (frames (T, H, W, 3) uint8, text or reference frames) -> float.
Scorer = Callable[..., float]
# (frames, reference frames), both (T, H, W, 3) uint8 -> object metrics (the toy world's instruments).
ObjectScorer = Callable[[np.ndarray, np.ndarray], Mapping[str, float | str]]


def _frames(video) -> np.ndarray:
    """float32 (T, H, W, 3) in [0, 255]."""
    return as_frames(video)


def background_colour(frames: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border over all frames: (3,)."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)  # (T, N, 3)
    return np.median(border.reshape(-1, 3), 0)


def _uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def reconstruction_mse(video, reference) -> dict[str, float]:
    a, ref = _frames(video), _frames(reference)
    if a.shape != ref.shape:
        raise ValueError(f"mse needs videos of one shape; got {a.shape} and reference {ref.shape} "
                         "(generate with the reference's --frames and --size)")
    flat = np.broadcast_to(background_colour(ref), ref.shape)
    return {"mse": float(np.mean((a / 127.5 - ref / 127.5) ** 2)),
            "mse_floor": float(np.mean((flat / 127.5 - ref / 127.5) ** 2))}


def temporal_coherence(video) -> float:
    """Mean cosine similarity of consecutive frames after removing the clip's mean frame
    (1 = every change continues smoothly; a static clip counts as 1)."""
    return frame_coherence(_frames(video))


def frame_coherence(frames: np.ndarray) -> float:
    """temporal_coherence of float32 (T, H, W, 3) frames."""
    x = (frames - frames.mean(0)).reshape(len(frames), -1)
    a, b = x[:-1], x[1:]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 1e-6, (a * b).sum(1) / np.maximum(norms, 1e-6), 1.0)
    return float(cos.mean()) if len(cos) else float("nan")


def external_score(scorer: Scorer | None, frames: np.ndarray, other) -> float | str:
    """A user-supplied model's score, or NOT_AVAILABLE when no scorer (no local weights) is given."""
    if scorer is None:
        return NOT_AVAILABLE
    value = float(scorer(frames, other))
    if not math.isfinite(value):
        raise ValueError(f"the supplied scorer returned {value}; it must return a finite number")
    return value


OBJECT_KEYS = ("id", "id_crop")
MOTION_KEYS = ("motion_fidelity", "trajectory_error", "centre_floor", "detection")


def score_video(video, reference=None, *, prompt: str | None = None, clip_scorer: Scorer | None = None,
                face_scorer: Scorer | None = None, object_scorer: ObjectScorer | None = None
                ) -> dict[str, float | str]:
    """Every metric that the inputs allow; the others are NOT_AVAILABLE. Keys: see the module doc.
    Videos are scored as the uint8 frames a person sees (a model tensor is rounded to 0..255 first).
    Without an `object_scorer` (real footage) the object columns are NOT_AVAILABLE: no instrument here
    can find an object in arbitrary footage."""
    frames = _uint8(_frames(video))
    ref = None if reference is None else _uint8(_frames(reference))
    out: dict[str, float | str] = {"temporal_coherence": temporal_coherence(frames)}
    if ref is not None:
        out["reference_coherence"] = temporal_coherence(ref)
        out.update(dict.fromkeys((*OBJECT_KEYS, *MOTION_KEYS), NOT_AVAILABLE))
        if object_scorer is not None:
            out.update(object_scorer(frames, ref))
        if frames.shape == ref.shape:
            out.update(reconstruction_mse(frames, ref))
        else:  # a different length or size: nothing frame-by-frame to compare
            out.update(dict.fromkeys(("mse", "mse_floor"), NOT_AVAILABLE))
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


__all__ = ["NOT_AVAILABLE", "background_colour", "reconstruction_mse", "temporal_coherence", "score_video",
           "format_table", "to_json", "external_score"]
