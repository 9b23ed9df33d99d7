"""What a personalization run checks before any heavy work, from configs and file headers alone.

    check_clips    each video's frame size (its header: one frame decoded) and clip length against the
                   largest clip the base's DiT takes (a learned position table, `abs_pos`, bounds it):
                   refused naming that largest clip in frames and pixels and the flag that fits it
    check_memory   an estimate of the memory training still needs once the base is loaded, against
                   what is free (CUDA: free device memory; CPU: MemAvailable): refused with both numbers

The memory estimate counts the DiT activations kept for the backward pass (per block and token ~16 D + 2 F
values: norms, q/k/v, attention and projection outputs, the cross-attention, the MLP; the attention
kernel's own L x L scores are not kept by SDPA's fused kernels, so not counted), and with gradient
checkpointing one block's worth plus each block's input. It is an estimate to catch runs that cannot
fit by a wide margin, not a promise that one under it fits.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import torch

from model.config import ModelConfig

from .config import PersonalizeConfig
from .video import fit_size

GIB = 2**30
# Activation values a block keeps per token, in units of D (dim) and F (ffn_dim); see the docstring.
_PER_TOKEN_D, _PER_TOKEN_F = 16, 2


def video_header(path: str) -> tuple[int, int, int | None, float]:
    """(H, W, frames or None when the container does not say, frame rate) of a video, reading one frame."""
    try:
        h, w = iio.improps(path, index=0).shape[:2]
        meta = iio.immeta(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"video {path!r} does not exist") from None
    except Exception as err:  # imageio raises many types for a file it cannot decode
        raise ValueError(f"cannot read video {path!r}: {type(err).__name__}: {str(err).splitlines()[0]}; "
                         "give an mp4/mov/webm/gif file that ffmpeg can decode") from None
    fps, duration = meta.get("fps"), meta.get("duration")
    frames = None
    if meta.get("plugin") == "ffmpeg" and fps and duration and math.isfinite(fps * duration):
        frames = round(fps * duration)
    rate = float(fps) if fps and math.isfinite(fps) and fps > 0 else 24.0
    return int(h), int(w), frames, rate


def largest_clip(mc: ModelConfig) -> tuple[int, int, int] | None:
    """(frames, H, W) of the largest clip the DiT's position table covers; None when nothing bounds it."""
    if mc.dit.abs_pos is None:
        return None
    (t, h, w), (pt, ph, pw) = mc.dit.abs_pos, mc.dit.patch
    sc, tc = mc.vae.space_compression, mc.vae.time_compression
    return 1 + (t * pt - 1) * tc, h * ph * sc, w * pw * sc


def planned_clip(cfg: PersonalizeConfig, mc: ModelConfig, header: tuple[int, int, int | None, float]
                 ) -> tuple[int | None, tuple[int, int]]:
    """(frames or None when unknown, (H, W)) the run will train on, as train/stage_data.read_videos picks."""
    h, w, available, rate = header
    size = cfg.size or fit_size(h, w, mc.size_multiple)
    if cfg.frames is not None:
        return cfg.frames, size
    if available is None:
        return None, size
    if cfg.fps is not None:  # resampled: about this many frames at the target rate
        available = max(1, round(available * cfg.fps / rate))
    return mc.longest_clip(available) or None, size


def check_clips(cfg: PersonalizeConfig, mc: ModelConfig) -> tuple[int | None, tuple[int, int]]:
    """Refuse a clip larger than the base takes, from the videos' headers; returns the planned
    (frames, (H, W)) of the first concept (frames None when its container does not say)."""
    limit = largest_clip(mc)
    plans = []
    for c in cfg.concepts:
        header = video_header(c.video)
        frames, size = planned_clip(cfg, mc, header)
        plans.append((frames, size))
        if limit is None:
            continue
        most_f, most_h, most_w = limit
        largest = f"at most {most_h}x{most_w} pixels and {most_f} frames"
        if size[0] > most_h or size[1] > most_w:
            what = (f"--size {size[0]}x{size[1]} is" if cfg.size else
                    f"video {c.video!r} has frames of {header[0]}x{header[1]} pixels,")
            raise ValueError(f"{what} larger than base {mc.name} takes: {largest}; pass --size "
                             f"{min(size[0], most_h)}x{min(size[1], most_w)} (the video is resized) or a "
                             "smaller video")
        if frames is not None and frames > most_f:
            what = (f"--frames {frames} is" if cfg.frames else
                    f"video {c.video!r} gives clips of {frames} frames,")
            raise ValueError(f"{what} longer than base {mc.name} takes: {largest}; pass --frames {most_f} "
                             "or fewer")
    return plans[0]


def training_bytes(cfg: PersonalizeConfig, mc: ModelConfig, frames: int, size: tuple[int, int],
                   act_bytes: int) -> int:
    """Estimated bytes a training step still needs once the base is loaded (see the docstring)."""
    stage_frames = [1 if s == 1 and not cfg.single_stage else frames for s in cfg.stages]
    tokens = max(math.prod(mc.token_grid(f, size)) for f in stage_frames)
    d, f, n = mc.dit.dim, mc.dit.ffn_dim, mc.dit.layers
    per_block = cfg.batch_size * tokens * (_PER_TOKEN_D * d + _PER_TOKEN_F * f) * act_bytes
    if cfg.grad_checkpointing:  # each block's input, and one block recomputed at a time
        return n * cfg.batch_size * tokens * d * act_bytes + per_block
    return n * per_block


def free_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free device memory, or the CPU's MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: no refusal


def check_memory(cfg: PersonalizeConfig, mc: ModelConfig, frames: int | None, size: tuple[int, int]) -> None:
    """Refuse, with the numbers, a run whose training step cannot fit in the free memory."""
    device = torch.device(cfg.device)
    frames = frames or (1 + mc.vae.time_compression)  # unknown length: the shortest clip, a lower bound
    need = training_bytes(cfg, mc, frames, size, 2 if device.type == "cuda" else 4)
    free = free_bytes(device)
    if need > free:
        hint = "" if cfg.grad_checkpointing else "--grad-checkpointing, "
        raise ValueError(f"this run needs about {need / GIB:.1f} GiB for a training step's activations "
                         f"(--batch-size {cfg.batch_size}, clips of {frames} frames at {size[0]}x{size[1]}, "
                         f"an estimate), but {device} has {free / GIB:.1f} GiB free; use {hint}a smaller "
                         "--batch-size, fewer --frames or a smaller --size")
