"""Reading videos into tensors: any container imageio can open (mp4/mov/webm through ffmpeg,
gif, a folder-free image sequence is out of scope), resampled in time and resized in space.

    path ──imageio──► (T, H, W, 3) uint8 + fps ──► resample to target fps ──► resize + centre crop
         ──► (C, T, H, W) float32 in [-1, 1]

Bad input fails here with a ValueError that names the file and the fix: an unreadable file, a
video with no frames, one too short for the frames asked for, a frame smaller than one latent cell.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of a video file as (T, H, W, 3) uint8 and its frame rate (frames per second)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    try:
        frames = iio.imread(path, index=None)
        meta = iio.immeta(path)
    except Exception as err:  # imageio raises many types for a file it cannot decode
        raise ValueError(f"cannot read video {str(path)!r}: {type(err).__name__}: {err}; "
                         "give an mp4/mov/webm/gif file that ffmpeg can decode") from err
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single image, or a grayscale video: decide by the channel count
        frames = frames[None] if frames.shape[-1] in (3, 4) else frames[..., None]
    if frames.ndim != 4 or frames.shape[0] == 0 or 0 in frames.shape[1:3]:
        raise ValueError(f"video {str(path)!r} has no frames (decoded shape {frames.shape})")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]  # drop alpha
    return frames.astype(np.uint8, copy=False), _frame_rate(meta)


def _frame_rate(meta: dict) -> float:
    """fps from ffmpeg's 'fps' or pillow's per-frame 'duration' (ms); 24 when the file names none."""
    fps = meta.get("fps")
    if fps and math.isfinite(fps) and fps > 0:
        return float(fps)
    duration = meta.get("duration")  # pillow (gif): milliseconds per frame
    if meta.get("plugin") != "ffmpeg" and duration and duration > 0:
        return 1000.0 / float(duration)
    return 24.0


def resample_indices(n_src: int, src_fps: float, fps: float | None, frames: int | None) -> list[int]:
    """Source frame indices for `frames` frames at `fps`, starting at frame 0: at each output time
    the source frame on screen then (floor of time x source fps).

    fps None keeps the source rate; frames None takes as many as the source duration gives.
    """
    step = 1.0 if fps is None else src_fps / fps  # source frames per output frame
    available = int(math.floor((n_src - 1) / step + 1e-6)) + 1
    n = available if frames is None else frames
    if n > available:
        rate = f"{src_fps:g} fps" if fps is None else f"{fps:g} fps (source {src_fps:g} fps)"
        raise ValueError(f"video has {n_src} frames, which gives {available} frames at {rate}; "
                         f"{n} are needed: give a longer video, fewer --frames, or a lower --fps")
    return [min(n_src - 1, int(math.floor(i * step + 1e-6))) for i in range(n)]


def resize_center_crop(video: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, T, H, W) -> (C, T, h, w): scale so the frame covers (h, w), then crop the centre."""
    c, t, h0, w0 = video.shape
    h, w = size
    scale = max(h / h0, w / w0)
    nh, nw = max(h, round(h0 * scale)), max(w, round(w0 * scale))
    if (nh, nw) != (h0, w0):
        x = video.permute(1, 0, 2, 3)  # (T, C, H, W): interpolate treats T as the batch
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        video = x.permute(1, 0, 2, 3)
    top, left = (nh - h) // 2, (nw - w) // 2
    return video[:, :, top : top + h, left : left + w]


def fit_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """The largest (h', w') <= (h, w) divisible by `multiple`: the centre crop a latent grid allows."""
    size = (h // multiple * multiple, w // multiple * multiple)
    if 0 in size:
        raise ValueError(f"frames of {h}x{w} pixels are smaller than one latent cell of {multiple} pixels; "
                         f"give a larger video or set --size to a multiple of {multiple}")
    return size


def read_video(
    path: str | Path,
    *,
    frames: int | None = None,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    multiple: int = 1,
) -> Tensor:
    """A video file as (C=3, T, H, W) float32 in [-1, 1].

    frames: how many frames to keep (None = all at the target rate); fps: target frame rate
    (None = the source's); size: (H, W) to resize and centre-crop to, each divisible by
    `multiple` (the VAE's spatial compression times the DiT patch); None = the source size
    cropped down to a multiple.
    """
    raw, src_fps = read_frames(path)
    idx = resample_indices(raw.shape[0], src_fps, fps, frames)
    video = torch.from_numpy(raw[idx]).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (C, T, H, W)
    if size is None:
        size = fit_size(video.shape[2], video.shape[3], multiple)
    elif size[0] % multiple or size[1] % multiple or min(size) <= 0:
        near = [max(multiple, s // multiple * multiple) for s in size]
        raise ValueError(f"size {size[0]}x{size[1]} is not a positive multiple of {multiple} "
                         f"(VAE spatial compression x DiT patch); give e.g. {near[0]}x{near[1]}")
    return resize_center_crop(video, size).clamp(-1.0, 1.0).contiguous()


def write_video(path: str | Path, video: Tensor, fps: float = 8.0) -> None:
    """(C, T, H, W) in [-1, 1] -> a gif or mp4 (by extension) a person can open."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, C)
    path = Path(path)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, frames, duration=1000.0 / fps, loop=0)
    else:
        iio.imwrite(path, frames, fps=fps, macro_block_size=1)
