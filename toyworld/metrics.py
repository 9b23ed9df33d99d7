"""The toy world's object metrics on top of sample/metrics.py, read from pixels with toyworld/instruments.py.

    id                  appearance similarity of the object: colour-histogram intersection in [0, 1];
                        `id_crop` is the cosine of aligned object crops (pattern and orientation)
    motion_fidelity     trajectory agreement with the reference: velocity correlation (floor 0),
                        and `trajectory_error` (px) beside `centre_floor` (always guessing the centre)
    edit_adherence      the fraction of the attributes an edit asked for (background, colour, shape,
                        motion) that the video shows, per attribute in `edit`

They assume the world's scenes (flat-coloured objects on a flat background), so they serve the tiny base
only; any base gets MSE, TC, CLIP-T and ArcFace from sample/metrics.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sample import metrics as M
from toyworld import instruments as ins

EDIT_KEYS = ("background", "colour", "shape", "motion")
Palette = Mapping[str, ins.RGB]


def identity_similarity(video, reference) -> dict[str, float | str]:
    """ID: colour-histogram intersection of the object masks (1 = same colours); beside it the cosine of
    frame-aligned object crops (pattern and orientation; NOT_AVAILABLE when the lengths differ)."""
    a, ref = ins.as_frames(video), ins.as_frames(reference)
    mask, ref_mask = ins.object_masks(a)[0], ins.object_masks(ref)[0]
    crop = (ins.crop_similarity(ins.object_crops(a, mask), ins.object_crops(ref, ref_mask))
            if len(a) == len(ref) else M.NOT_AVAILABLE)
    hist, ref_hist = ins.colour_histogram(a, mask), ins.colour_histogram(ref, ref_mask)
    return {"id": ins.appearance_similarity(hist, ref_hist), "id_crop": crop}


def motion_fidelity(video, reference) -> dict[str, float]:
    """Trajectory agreement with the reference: velocity correlation (1 = same motion, 0 = unrelated),
    trajectory error (px) and its centre-guess floor, detection rate of the object."""
    a, ref = ins.as_frames(video), ins.as_frames(reference)
    if len(a) != len(ref):
        raise ValueError(f"motion fidelity compares frame by frame; the video has {len(a)} frames, "
                         f"the reference {len(ref)}")
    traj, ref_traj = ins.trajectory(a)[0], ins.trajectory(ref)[0]
    return {"motion_fidelity": ins.velocity_correlation(traj, ref_traj),
            "trajectory_error": ins.trajectory_error(traj, ref_traj),
            "centre_floor": ins.centre_guess_error(ref_traj, ref.shape[1], ref.shape[2]),
            "detection": ins.detection_rate(traj)}


def object_scores(frames: np.ndarray, ref: np.ndarray) -> dict[str, float | str]:
    """sample.metrics.score_video's `object_scorer` for toy-world videos: ID, and motion when the lengths
    agree."""
    out = identity_similarity(frames, ref)
    if len(frames) == len(ref):
        out.update(motion_fidelity(frames, ref))
    return out


def edit_adherence(video, asked: Mapping[str, str], backgrounds: Palette, colours: Palette
                   ) -> dict[str, float]:
    """What an edit asked for, e.g. {"background": "green"} or {"colour": "red", "motion": "left"}:
    `edit_adherence` = fraction present, plus `edit_<key>` (1.0 / 0.0) per asked attribute.
    Object attributes are read from the (single) object."""
    unknown = sorted(set(asked) - set(EDIT_KEYS))
    if unknown or not asked:
        raise ValueError(f"edit attributes {unknown or '{}'}: ask for one or more of {EDIT_KEYS}")
    frames = np.clip(np.round(ins.as_frames(video)), 0, 255).astype(np.uint8)
    got = ins.measure(frames, 1, backgrounds, colours)
    obj = got["objects"][0]
    seen = {"background": got["background"], **{k: obj[k] for k in ("colour", "shape", "motion")}}
    hits = {f"edit_{k}": float(seen[k] == v) for k, v in asked.items()}
    return {"edit_adherence": float(np.mean(list(hits.values()))), **hits}


def score_toy_video(video, reference=None, *, edit: Mapping[str, str] | None = None,
                    backgrounds: Palette | None = None, colours: Palette | None = None,
                    **scorers) -> dict[str, float | str]:
    """sample.metrics.score_video with the object instruments, plus edit adherence when `edit` is given
    (with the world's palettes). `scorers`: prompt, clip_scorer, face_scorer as score_video takes them."""
    out = M.score_video(video, reference, object_scorer=object_scores, **scorers)
    if edit:
        if backgrounds is None or colours is None:
            raise ValueError("edit adherence needs the world's palettes (backgrounds and colours)")
        clip_t = {k: out.pop(k) for k in ("clip_t", "arcface")}
        out.update(edit_adherence(video, edit, backgrounds, colours))
        out.update(clip_t)
    return out
