"""Scores of a toy-world experiment and the reports a person reads: per-video numbers, their mean
and spread over seeds, each beside its floor, goals checked, a markdown page and a JSON file.

Everything is read from pixels with toyworld/instruments.py; nothing here knows how a video was made.
The world's palettes are passed in.

    score_concept_video   one generated video against the concept's reference clip (sample/metrics
                          plus the per-frame appearance and its flat-colour floor)
    score_with_extra      an edit that adds an ordinary second object: the sprite and the added object
                          are told apart by colour, each tracked against its own target path
    summarize             mean, spread (standard deviation) and count over several videos
    markdown_table / write_report

Floors (what a trivial answer scores): `mse_floor` a flat video of the reference's background;
`centre_floor` always guessing the frame centre; `id_crop_floor` the reference itself with the
sprite flattened to its mean colour (right place, size and colour, no pattern); chance 1/5 for
a background name; velocity correlation 0 for a motion unrelated to the reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from toyworld import instruments as ins
from toyworld.metrics import score_toy_video

Palette = Mapping[str, ins.RGB]
EXTRA_DISTANCE = 80.0  # RGB distance within which a pixel counts as the added object's colour


def _frames(video) -> np.ndarray:
    """uint8-rounded float32 (T, H, W, 3) in [0, 255]: what a person sees."""
    return np.clip(np.round(ins.as_frames(video)), 0, 255)


# ------------------------------------------------------------------------------------- appearance


def crop_cosines(frames: np.ndarray, mask: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray) -> np.ndarray:
    """Per-frame cosine of aligned object crops (T,); NaN where either frame has no object."""
    a, b = ins.object_crops(frames, mask), ins.object_crops(ref, ref_mask)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-12), np.nan)


def flat_colour_floor(ref: np.ndarray, ref_mask: np.ndarray) -> float:
    """Crop cosine of the reference with its sprite flattened to the sprite's mean colour."""
    flat = ref.copy()
    flat[ref_mask] = ref[ref_mask].mean(0)
    return float(np.nanmean(crop_cosines(flat, ref_mask, ref, ref_mask)))


def _appearance(frames: np.ndarray, mask: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray) -> dict:
    cos = crop_cosines(frames, mask, ref, ref_mask)
    found = ~np.isnan(cos)
    return {
        "id_crop": float(np.nanmean(cos)) if found.any() else 0.0,
        "id_crop_min": float(np.min(np.where(found, cos, 0.0))),  # a frame without the object scores 0
        "id_crop_floor": flat_colour_floor(ref, ref_mask),
    }


# ------------------------------------------------------------------------------------------ scores


def score_concept_video(
    video, reference, *, backgrounds: Palette, colours: Palette, background: str | None = None
) -> dict[str, float]:
    """One video with the concept's sprite alone, against the reference clip (the sprite's true path
    and look). `background`: the background the prompt asked for (edit adherence), if any."""
    frames, ref = _frames(video), _frames(reference)
    edit = {"background": background} if background else None
    out = score_toy_video(
        frames.astype(np.uint8), ref.astype(np.uint8), edit=edit, backgrounds=backgrounds, colours=colours
    )
    out = {k: v for k, v in out.items() if not isinstance(v, str)}  # drop NOT_AVAILABLE scorers
    mask, ref_mask = ins.object_masks(frames)[0], ins.object_masks(ref)[0]
    out.update(_appearance(frames, mask, ref, ref_mask))
    return out


def extra_mask(
    frames: np.ndarray, bg: np.ndarray, sprite_colours: np.ndarray, extra_rgb: np.ndarray
) -> np.ndarray:
    """(T, H, W) pixels nearer the added object's colour than the background and the sprite's colours,
    and within EXTRA_DISTANCE of it; opened (3x3) to drop edge specks."""
    palette = np.concatenate([bg[None], sprite_colours, extra_rgb[None]]).astype(np.float32)  # (P, 3)
    dist = np.linalg.norm(frames[..., None, :] - palette, axis=-1)  # (T, H, W, P)
    near = (dist.argmin(-1) == len(palette) - 1) & (dist[..., -1] < EXTRA_DISTANCE)
    return ins.open_mask(near)


def linear_motion(traj: np.ndarray, still_px: float = 3.0) -> str:
    """The vocabulary name of a least-squares line through a (T, 2) trajectory (NaN frames skipped):
    still / left / right / up / down. Unlike instruments.classify_motion it shrugs off a few frames where
    another object hides part of this one (the sprite of an edit passes over the added object)."""
    t = np.arange(len(traj), dtype=np.float64)
    ok = ~np.isnan(traj).any(1)
    if ok.sum() < 2:
        return "other"
    slope = np.polyfit(t[ok], traj[ok], 1)[0]  # (2,) px per frame
    travel = slope * (len(traj) - 1)
    if np.linalg.norm(travel) < still_px:
        return "still"
    if abs(travel[0]) >= abs(travel[1]):
        return "right" if travel[0] > 0 else "left"
    return "down" if travel[1] > 0 else "up"


def score_with_extra(
    video, reference, target, *, sprite_colours, extra_rgb, extra_motion: str, backgrounds: Palette
) -> dict[str, float]:
    """An edit that adds an ordinary object ("... and a red square moves up ..."). `reference`: the
    concept's clip (the sprite's look); `target`: the edit rendered by the world (both objects on
    their true paths). The added object is found by colour, the sprite is the rest of the foreground.

    extra_found      the added object is there in at least half the frames
    extra_motion_ok  its trajectory reads as the asked motion (e.g. "up"; a line fit for linear motions)
    extra_adherence  both (the edit's adherence)
    extra_error      its trajectory error (px) against the target's; sprite_* as in score_concept_video
    """
    frames, ref, tgt = _frames(video), _frames(reference), _frames(target)
    sprite_colours, extra_rgb = np.asarray(sprite_colours, np.float32), np.asarray(extra_rgb, np.float32)
    bg, tgt_bg = ins.background_colour(frames), ins.background_colour(tgt)
    extra = extra_mask(frames, bg, sprite_colours, extra_rgb)
    tgt_extra = extra_mask(tgt, tgt_bg, sprite_colours, extra_rgb)
    sprite = ins.open_mask(ins.foreground(frames, bg) & ~ins._shift_reduce(extra, np.logical_or))
    tgt_sprite = ins.open_mask(ins.foreground(tgt, tgt_bg) & ~ins._shift_reduce(tgt_extra, np.logical_or))
    ref_mask = ins.object_masks(ref)[0]
    traj, tgt_traj = ins.centroids(extra), ins.centroids(tgt_extra)
    s_traj, s_tgt = ins.centroids(sprite), ins.centroids(tgt_sprite)
    found = ins.detection_rate(traj) >= 0.5
    linear = extra_motion in ("still", "left", "right", "up", "down")
    motion_ok = found and (linear_motion(traj) if linear else ins.classify_motion(traj)) == extra_motion
    out = {
        "extra_found": float(found),
        "extra_motion_ok": float(motion_ok),
        "extra_adherence": float(found and motion_ok),
        "extra_error": ins.trajectory_error(traj, tgt_traj),
        "extra_centre_floor": ins.centre_guess_error(tgt_traj, *tgt.shape[1:3]),
        "mse": float(np.mean((frames / 127.5 - tgt / 127.5) ** 2)),
        "mse_floor": ins.flat_video_mse(tgt.astype(np.uint8)),
        "trajectory_error": ins.trajectory_error(s_traj, s_tgt),
        "centre_floor": ins.centre_guess_error(s_tgt, *tgt.shape[1:3]),
        "motion_fidelity": ins.velocity_correlation(s_traj, s_tgt),
        "detection": ins.detection_rate(s_traj),
        "temporal_coherence": ins.temporal_coherence(frames),
        "background_ok": float(ins.nearest_name(bg, backgrounds) == ins.nearest_name(tgt_bg, backgrounds)),
    }
    out.update(_appearance(frames, sprite, ref, ref_mask))
    return out


# -------------------------------------------------------------------------------------- summaries


def summarize(scores: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n", "nan"}} over videos; NaNs (nothing measurable; None once a record
    went through JSON) are counted, not averaged."""
    keys = list(dict.fromkeys(k for s in scores for k in s))
    out = {}
    for k in keys:
        vals = np.array([math.nan if s[k] is None else float(s[k]) for s in scores if k in s], np.float64)
        ok = vals[~np.isnan(vals)]
        out[k] = {
            "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan,
            "n": int(vals.size),
            "nan": int(vals.size - ok.size),
        }
    return out


def mean_of(summary: Mapping[str, Mapping[str, float]], key: str) -> float:
    return float(summary[key]["mean"]) if key in summary else math.nan


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def fmt_pm(entry: Mapping[str, float] | None, digits: int = 3) -> str:
    """'mean ± std' of a summarize() entry (with the NaN count when some videos had nothing to measure)."""
    if entry is None:
        return "n/a"
    text = f"{fmt(entry['mean'], digits)} ± {fmt(entry['std'], 2)}"
    return text + (f" ({entry['nan']}/{entry['n']} n/a)" if entry.get("nan") else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def clean_json(value):
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(folder: str | Path, markdown: str, data: Mapping, stem: str = "report") -> tuple[Path, Path]:
    """FOLDER/report.md and FOLDER/report.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"{stem}.md", folder / f"{stem}.json"
    md.write_text(markdown.rstrip() + "\n")
    js.write_text(json.dumps(clean_json(data), indent=2) + "\n")
    return md, js


__all__ = [
    "score_concept_video",
    "score_with_extra",
    "crop_cosines",
    "flat_colour_floor",
    "extra_mask",
    "linear_motion",
    "summarize",
    "mean_of",
    "fmt",
    "fmt_pm",
    "markdown_table",
    "clean_json",
    "write_report",
]
