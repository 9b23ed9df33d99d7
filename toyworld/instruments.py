"""Measuring instruments for toy-world videos, computed from pixels only.

Nothing here sees a generator's hidden state: every function takes frames (and, where a name is
wanted, the public vocabulary as a name -> RGB palette). The world's layout rules that captions
promise are used as such: the background is flat, objects differ from it by colour, and in a
two-object scene the first-named object lives in the left half of the frame.

Every number has a trivial floor beside it: `chance_rates` (uniform and majority-class rates),
`flat_video_mse` (a video of the reference's own background colour), `centre_guess_error`
(always guessing the frame centre).

Frames: (T, H, W, 3) uint8, or a float (3, T, H, W) tensor/array in [-1, 1] (the model's
convention); `as_frames` (sample/media.py) turns either into float32 (T, H, W, 3) in [0, 255]. Positions are
(x, y) pixel coordinates with pixel i spanning [i, i + 1), y pointing down.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from sample.media import as_frames
from sample.metrics import background_colour
from sample.metrics import frame_coherence as temporal_coherence

RGB = tuple[int, int, int]
# Bounding-box fill ratio of each shape (area / box area): the shape classifier's prototypes.
SHAPE_FILL: dict[str, float] = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
# Labels `classify_motion` can return; the toy vocabulary uses the first six.
MOTION_LABELS: tuple[str, ...] = ("still", "left", "right", "up", "down", "clockwise", "counterclockwise",
                                  "other")
FOREGROUND_THRESHOLD = 48.0  # RGB distance from the background that counts as object (palette gaps >= 120)
MIN_PIXELS = 12  # fewer foreground pixels in a frame = no object found there


# ---------------------------------------------------------------------------------------------
# Colours and masks


def nearest_name(rgb: np.ndarray, palette: Mapping[str, RGB]) -> str | None:
    """Name of the palette colour nearest to rgb (None for a NaN colour: nothing was found)."""
    if np.any(np.isnan(rgb)):
        return None
    names = list(palette)
    dist = np.linalg.norm(np.array([palette[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(dist))]


def foreground(frames: np.ndarray, bg: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Pixels that differ from the background colour: (T, H, W) bool."""
    return np.linalg.norm(frames - bg, axis=-1) > threshold


def _shift_reduce(mask: np.ndarray, op) -> np.ndarray:
    """3x3 erosion (op=np.logical_and) or dilation (np.logical_or) of (T, H, W) masks; edges replicate."""
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = mask.shape[1:]
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out = op(out, pad[:, dy : dy + h, dx : dx + w])
    return out


def open_mask(mask: np.ndarray) -> np.ndarray:
    """Morphological opening (3x3): removes specks thinner than 3 px, keeps objects' outlines."""
    return _shift_reduce(_shift_reduce(mask, np.logical_and), np.logical_or)


def object_masks(frames: np.ndarray, n_objects: int = 1, bg: np.ndarray | None = None) -> np.ndarray:
    """(K, T, H, W) bool: the opened foreground, or its left and right halves in a two-object scene."""
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects={n_objects}: the toy world has one- and two-object scenes only")
    fg = open_mask(foreground(frames, background_colour(frames) if bg is None else bg))
    if n_objects == 1:
        return fg[None]
    half = fg.shape[-1] // 2
    left, right = fg.copy(), fg.copy()
    left[..., half:] = False
    right[..., :half] = False
    return np.stack([left, right])


def solid_mask(frames: np.ndarray, mask: np.ndarray, bg: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Refine a mask of a one-colour object to its 50% contour: the pixels (within the mask's
    3x3-dilated region) nearer the object colour than the background along the bg -> colour line.
    Keeps a blurred edge where it would be without blur, whatever the colour contrast."""
    if np.any(np.isnan(colour)):
        return mask
    axis = colour - bg
    t = ((frames - bg) @ axis) / max(float(axis @ axis), 1e-6)  # (T, H, W), 0 = bg, 1 = object
    return open_mask((t > 0.5) & _shift_reduce(mask, np.logical_or))


def object_colour(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median colour of the masked pixels over all frames: (3,), NaN when the mask is empty."""
    if mask.sum() == 0:
        return np.full(3, np.nan, np.float32)
    return np.median(frames[mask], 0)


# ---------------------------------------------------------------------------------------------
# Shape and position


def _bbox_fill(mask: np.ndarray) -> np.ndarray:
    """Per-frame mask area / bounding-box area: (T,), NaN for frames without an object."""
    rows, cols = mask.any(2), mask.any(1)  # (T, H), (T, W)
    height = rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1)
    width = cols.shape[1] - cols[:, ::-1].argmax(1) - cols.argmax(1)
    count = mask.sum((1, 2))
    return np.where(count >= MIN_PIXELS, count / np.maximum(height * width, 1), np.nan)


def classify_shape(mask: np.ndarray) -> str | None:
    """Nearest SHAPE_FILL prototype to the median bounding-box fill ratio of a (T, H, W) mask."""
    fill = _bbox_fill(mask)
    if np.all(np.isnan(fill)):
        return None
    median = np.nanmedian(fill)
    return min(SHAPE_FILL, key=lambda name: abs(SHAPE_FILL[name] - median))


def centroids(mask: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centroid of a (T, H, W) mask: (T, 2), NaN where fewer than MIN_PIXELS."""
    t, h, w = mask.shape
    count = mask.sum((1, 2)).astype(np.float64)
    x = (mask.sum(1) * (np.arange(w) + 0.5)).sum(1)
    y = (mask.sum(2) * (np.arange(h) + 0.5)).sum(1)
    out = np.stack([x, y], 1) / np.maximum(count, 1)[:, None]
    out[count < MIN_PIXELS] = np.nan
    return out


def classify_motion(traj: np.ndarray, still_px: float = 2.5) -> str:
    """A MOTION_LABELS name from a (T, 2) trajectory (NaN frames are skipped).

    still: every position within still_px of the median. Linear: net displacement at least half
    the path length, named by its dominant axis. Orbit: enclosed signed area at least a quarter of
    a circle's with the same perimeter; positive shoelace area is clockwise on screen (y down).
    Anything else (a jumble, a figure-eight) is "other".
    """
    p = traj[~np.isnan(traj).any(1)]
    if len(p) < 2:
        return "other"
    if np.linalg.norm(p - np.median(p, 0), axis=1).max() < still_px:
        return "still"
    net = p[-1] - p[0]
    path = np.linalg.norm(np.diff(p, axis=0), axis=1).sum()
    if np.linalg.norm(net) >= 0.5 * path:
        if abs(net[0]) >= abs(net[1]):
            return "right" if net[0] > 0 else "left"
        return "down" if net[1] > 0 else "up"
    x, y = p[:, 0] - p[:, 0].mean(), p[:, 1] - p[:, 1].mean()
    area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    if abs(area) >= 0.25 * path**2 / (4 * math.pi):
        return "clockwise" if area > 0 else "counterclockwise"
    return "other"


def trajectory(frames: np.ndarray, n_objects: int = 1) -> np.ndarray:
    """Centroid trajectory of each object: (K, T, 2)."""
    return np.stack([centroids(m) for m in object_masks(frames, n_objects)])


def trajectory_error(traj: np.ndarray, ref: np.ndarray) -> float:
    """Mean distance (px) between trajectories over frames where both have an object; NaN if none."""
    d = np.linalg.norm(traj - ref, axis=-1)
    return float(np.nanmean(d)) if np.any(~np.isnan(d)) else float("nan")


def velocity_correlation(traj: np.ndarray, ref: np.ndarray, stride: int = 2) -> float:
    """Pearson correlation of velocities over `stride` frames (x and y steps pooled); NaN if undefined.

    Stride 2 because hard-edged objects move in whole pixels: at 1.5 px a frame the measured
    one-frame steps are 1 or 2 px, which caps a perfect clip's stride-1 correlation near 0.9-0.96
    (0.7-0.87 for slower two-object clips); stride 2 brings clean clips to >= 0.99 (>= 0.9).
    """
    if len(traj) <= stride:
        return float("nan")
    a, b = (traj[stride:] - traj[:-stride]).ravel(), (ref[stride:] - ref[:-stride]).ravel()
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def max_jump(traj: np.ndarray) -> float:
    """Largest frame-to-frame centroid step (px): a sudden jump flags a broken trajectory."""
    steps = np.linalg.norm(np.diff(traj, axis=0), axis=1)
    return float(np.nanmax(steps)) if np.any(~np.isnan(steps)) else float("nan")


def detection_rate(traj: np.ndarray) -> float:
    """Fraction of frames where an object was found."""
    return float(np.mean(~np.isnan(traj).any(-1)))


# ---------------------------------------------------------------------------------------------
# Appearance


def colour_histogram(frames: np.ndarray, mask: np.ndarray, bins: int = 4) -> np.ndarray:
    """Joint RGB histogram of the masked pixels over all frames, summing to 1: (bins**3,)."""
    pix = frames[mask]
    if pix.shape[0] == 0:
        return np.zeros(bins**3)
    q = np.clip((pix / 256 * bins).astype(int), 0, bins - 1)
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return hist / hist.sum()


def appearance_similarity(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    """Histogram intersection in [0, 1] (1 = the same colour distribution)."""
    return float(np.minimum(hist_a, hist_b).sum())


def object_crops(frames: np.ndarray, mask: np.ndarray, size: int = 32) -> np.ndarray:
    """Per-frame size x size crops centred on the object's centroid, background zeroed, in [-1, 1]:
    (T, size, size, 3); frames without an object are all zero."""
    t, h, w, _ = frames.shape
    pad = size
    img = np.pad(np.where(mask[..., None], frames / 127.5 - 1, 0.0), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros((t, size, size, 3))
    for i, (x, y) in enumerate(centroids(mask)):
        if np.isnan(x):
            continue
        x0, y0 = int(round(x)) - size // 2 + pad, int(round(y)) - size // 2 + pad
        out[i] = img[i, y0 : y0 + size, x0 : x0 + size]
    return out


def crop_similarity(crops_a: np.ndarray, crops_b: np.ndarray) -> float:
    """Mean over frames of the cosine similarity of aligned object crops (pattern and orientation)."""
    a, b = crops_a.reshape(len(crops_a), -1), crops_b.reshape(len(crops_b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = norms > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(np.where(ok, (a * b).sum(1) / np.maximum(norms, 1e-12), 0.0)))


# ---------------------------------------------------------------------------------------------
# Whole-video measures and floors


def mse(video, reference) -> float:
    """Mean squared error in the model's [-1, 1] scale."""
    a, b = as_frames(video) / 127.5 - 1, as_frames(reference) / 127.5 - 1
    if a.shape != b.shape:
        raise ValueError(f"mse of videos with different shapes {a.shape} and {b.shape}")
    return float(np.mean((a - b) ** 2))


def flat_video_mse(reference) -> float:
    """Floor: the MSE of a video filled with the reference's own background colour."""
    frames = as_frames(reference)
    flat = np.broadcast_to(background_colour(frames), frames.shape)
    return float(np.mean((flat / 127.5 - frames / 127.5) ** 2))


def centre_guess_error(ref: np.ndarray, height: int, width: int) -> float:
    """Floor: the trajectory error of always guessing the frame centre."""
    return trajectory_error(np.broadcast_to(np.array([width / 2, height / 2]), ref.shape), ref)


def chance_rates(labels: Sequence, n_classes: int) -> dict[str, float]:
    """Trivial floors of a classification: a uniform guess and always guessing the commonest label."""
    labels = list(labels)
    majority = Counter(labels).most_common(1)[0][1] / len(labels) if labels else float("nan")
    return {"uniform": 1.0 / n_classes, "majority": majority}


# ---------------------------------------------------------------------------------------------
# Attribute read-out and accuracy


def measure(video, n_objects: int, backgrounds: Mapping[str, RGB], colours: Mapping[str, RGB]) -> dict:
    """Read a toy-world video's attributes from its pixels: background name and, per object,
    colour name, shape, motion label and trajectory. Shape and trajectory use the object's mask
    refined to its 50% colour contour (`solid_mask`), which keeps them right on blurred or noisy
    frames (tests: Gaussian noise sd 16, a 5-tap spatial blur)."""
    frames = as_frames(video)
    bg = background_colour(frames)
    objects = []
    for coarse in object_masks(frames, n_objects, bg):
        rgb = object_colour(frames, coarse)
        mask = solid_mask(frames, coarse, bg, rgb)
        traj = centroids(mask)
        objects.append({"colour": nearest_name(rgb, colours), "shape": classify_shape(mask),
                        "motion": classify_motion(traj), "trajectory": traj})
    return {"background": nearest_name(bg, backgrounds), "objects": objects}


def attribute_accuracy(videos: Sequence, intended: Sequence[Mapping], backgrounds: Mapping[str, RGB],
                       colours: Mapping[str, RGB], motions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy per attribute of a batch of videos against the attributes they were meant to have.

    intended[i] = {"background": name, "objects": [{"colour", "shape", "motion"}, ...]} (one or two
    objects, first = left). Returns {attribute: {"accuracy", "uniform", "majority", "n"}}, where
    uniform/majority are the chance floors for that attribute over this batch. "pair_colour" is colour
    over the objects of two-object clips alone: a scene drawn with its objects' sides swapped (the
    caption's binding of colour to position lost) gets both wrong there, while one-object colour holds.
    """
    if len(videos) != len(intended):
        raise ValueError(f"{len(videos)} videos but {len(intended)} intended attribute sets")
    hits: dict[str, list[bool]] = {k: [] for k in ("background", "colour", "shape", "motion", "pair_colour")}
    truth: dict[str, list[str]] = {k: [] for k in hits}
    for video, want in zip(videos, intended, strict=True):
        got = measure(video, len(want["objects"]), backgrounds, colours)
        hits["background"].append(got["background"] == want["background"])
        truth["background"].append(want["background"])
        for obj_got, obj_want in zip(got["objects"], want["objects"], strict=True):
            for key in ("colour", "shape", "motion"):
                hits[key].append(obj_got[key] == obj_want[key])
                truth[key].append(obj_want[key])
            if len(want["objects"]) == 2:
                hits["pair_colour"].append(obj_got["colour"] == obj_want["colour"])
                truth["pair_colour"].append(obj_want["colour"])
    sizes = {"background": len(backgrounds), "colour": len(colours), "shape": len(SHAPE_FILL),
             "motion": len(motions), "pair_colour": len(colours)}
    return {k: {"accuracy": float(np.mean(hits[k])) if hits[k] else float("nan"),
                **chance_rates(truth[k], sizes[k]), "n": len(hits[k])} for k in hits}


def compare_to_reference(video, reference, backgrounds: Mapping[str, RGB] | None = None) -> dict:
    """How far a generated one-object video is from a reference video (a concept's training clip),
    every number beside its floor. Both are read from pixels with the same instruments.

    mse / mse_floor (a flat video of the reference's background); trajectory_error / centre_floor
    (always guessing the frame centre); velocity_correlation (floor 0, a guess unrelated to the
    motion); appearance (colour-histogram intersection) and crop_similarity of the object;
    temporal_coherence (beside the reference's own) and max_jump of the video; detection (frames
    where an object was found); background name when `backgrounds` is given.
    """
    frames, ref = as_frames(video), as_frames(reference)
    mask, ref_mask = object_masks(frames)[0], object_masks(ref)[0]
    traj, ref_traj = centroids(mask), centroids(ref_mask)
    out: dict[str, float | str] = {
        "mse": mse(frames.transpose(3, 0, 1, 2) / 127.5 - 1, ref.transpose(3, 0, 1, 2) / 127.5 - 1),
        "mse_floor": flat_video_mse(reference),
        "trajectory_error": trajectory_error(traj, ref_traj),
        "centre_floor": centre_guess_error(ref_traj, ref.shape[1], ref.shape[2]),
        "velocity_correlation": velocity_correlation(traj, ref_traj),
        "appearance": appearance_similarity(colour_histogram(frames, mask), colour_histogram(ref, ref_mask)),
        "crop_similarity": crop_similarity(object_crops(frames, mask), object_crops(ref, ref_mask)),
        "temporal_coherence": temporal_coherence(frames),
        "reference_coherence": temporal_coherence(ref),  # coherence depends on speed and pattern
        "max_jump": max_jump(traj),
        "detection": detection_rate(traj),
    }
    if backgrounds is not None:
        out["background"] = nearest_name(background_colour(frames), backgrounds)
    return out
