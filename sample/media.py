"""Files a person can open: mp4 (imageio-ffmpeg, H.264), gif (Pillow) and a PNG contact sheet.

Frames: a model video (C=3, T, H, W) float in [-1, 1] (torch or numpy), or (T, H, W, 3) uint8;
`to_uint8` turns either into (T, H, W, 3) uint8. Files are written atomically (a temporary file
beside the target, then os.replace), so an interrupted run never leaves half a video.

GIF note: Pillow merges identical consecutive frames into one (their durations add up), so a
video with a still stretch reads back with fewer gif frames; the mp4 keeps every frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.tempfiles import publish, remove_stale, temp_path

SHEET_PAD = 2  # pixels between cells
SHEET_BACKGROUND = (24, 24, 24)
LABEL_HEIGHT = 12  # pixels of the label strip above each row (Pillow's default bitmap font)


def as_frames(video) -> np.ndarray:
    """uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1] (numpy or torch) -> float32 (T, H, W, 3) 0..255."""
    if hasattr(video, "detach"):
        video = video.detach().cpu()
        video = (video.float() if video.is_floating_point() else video).numpy()  # bf16 has no numpy dtype
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected one video, (T, H, W, 3) uint8 or (3, T, H, W) float, "
                         f"got shape {video.shape}")
    if video.dtype == np.uint8:
        if video.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got shape {video.shape}")
        return video.astype(np.float32)
    if video.shape[0] != 3:
        raise ValueError(f"float video must be (3, T, H, W) in [-1, 1], got shape {video.shape}")
    return ((np.clip(video, -1, 1) + 1) * 127.5).transpose(1, 2, 3, 0).astype(np.float32)


def to_uint8(video) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] or (T, H, W, 3) uint8 -> (T, H, W, 3) uint8 (validated by as_frames)."""
    return np.ascontiguousarray(np.round(as_frames(video)).astype(np.uint8))


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)  # a killed earlier write's temporary
    tmp = temp_path(path, keep_suffix=True)  # the suffix picks the format
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_mp4(path: str | Path, video, fps: float = 8.0) -> Path:
    """H.264 mp4 through imageio-ffmpeg. Frame sides should be even (yuv420p); ours are multiples of 8."""
    frames = to_uint8(video)
    return _atomic(Path(path), lambda tmp: iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps,
                                                       macro_block_size=1))


def write_gif(path: str | Path, video, fps: float = 8.0) -> Path:
    """Looping gif through Pillow (see the note above on identical frames)."""
    frames = to_uint8(video)
    return _atomic(Path(path), lambda tmp: iio.imwrite(tmp, frames, plugin="pillow",
                                                       duration=1000.0 / fps, loop=0))


def pick_frames(n: int, columns: int | None) -> np.ndarray:
    """Indices of at most `columns` frames spread evenly over n, first and last included."""
    if columns is None or columns >= n:
        return np.arange(n)
    if columns < 1:
        raise ValueError(f"a contact sheet needs at least 1 column, got {columns}")
    return np.unique(np.round(np.linspace(0, n - 1, columns)).astype(int))


def contact_sheet(videos: Sequence, labels: Sequence[str] | None = None, columns: int | None = None,
                  ) -> np.ndarray:
    """One row per video (give the reference first), one column per frame: (H_sheet, W_sheet, 3) uint8.

    Every video must have the same frame size; a row with fewer frames leaves its last cells
    empty. `columns` caps the frames shown (picked evenly). With `labels`, a strip above each row
    carries its label.
    """
    rows = [to_uint8(v) for v in videos]
    if not rows:
        raise ValueError("a contact sheet needs at least one video")
    sizes = {r.shape[1:3] for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"contact sheet rows have different frame sizes {sorted(sizes)}; "
                         "resize them to one size first")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} videos")
    (h, w), n = sizes.pop(), max(len(r) for r in rows)
    idx = pick_frames(n, columns)
    strip = LABEL_HEIGHT if labels is not None else 0
    row_h = strip + h + SHEET_PAD
    sheet = np.empty((SHEET_PAD + len(rows) * row_h, SHEET_PAD + len(idx) * (w + SHEET_PAD), 3), np.uint8)
    sheet[:] = SHEET_BACKGROUND
    for i, row in enumerate(rows):
        top = SHEET_PAD + i * row_h + strip
        for j, k in enumerate(idx):
            if k < len(row):
                left = SHEET_PAD + j * (w + SHEET_PAD)
                sheet[top : top + h, left : left + w] = row[k]
    if labels is None:
        return sheet
    image = Image.fromarray(sheet)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, label in enumerate(labels):
        draw.text((SHEET_PAD, SHEET_PAD + i * row_h), str(label), fill=(235, 235, 235), font=font)
    return np.asarray(image)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    return _atomic(Path(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_contact_sheet(path: str | Path, videos: Sequence, labels: Sequence[str] | None = None,
                        columns: int | None = None) -> Path:
    return write_png(path, contact_sheet(videos, labels, columns))


def write_video_files(out: Path, video, fps: float, *, sheet_label: str | None = None,
                      reference=None) -> list[Path]:
    """OUT.mp4 and OUT.gif beside it; with `sheet_label`, OUT.png too: a contact sheet of the video (under
    the reference, when one is given)."""
    written = [write_mp4(out, video, fps), write_gif(out.with_suffix(".gif"), video, fps)]
    if sheet_label is not None:
        rows, labels = [video], [sheet_label]
        if reference is not None:
            rows, labels = [reference, video], ["reference", sheet_label]
        written.append(write_contact_sheet(out.with_suffix(".png"), rows, labels))
    return written


__all__ = ["as_frames", "to_uint8", "write_video_files", "write_mp4", "write_gif", "contact_sheet",
           "write_contact_sheet", "write_png", "pick_frames"]
