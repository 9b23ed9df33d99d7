"""Reading videos: containers, frame rate, size, and bad input (train/video.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.video import read_frames, read_video, resample_indices, resize_center_crop, write_video


def _ramp_video(frames: int, h: int, w: int) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] whose brightness encodes the frame index (survives lossy codecs)."""
    level = torch.linspace(-0.8, 0.8, frames).view(1, frames, 1, 1)
    return level.expand(3, frames, h, w).clone()


@pytest.fixture
def mp4(tmp_path):
    path = tmp_path / "ramp.mp4"
    write_video(path, _ramp_video(16, 32, 48), fps=16)
    return path


def test_mp4_reads_as_channels_first_in_range(mp4):
    video = read_video(mp4)
    assert video.shape == (3, 16, 32, 48)
    assert video.dtype == torch.float32 and video.min() >= -1 and video.max() <= 1
    # Brightness rises frame by frame as written (codec error well under one ramp step of 0.107).
    means = video.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.linspace(-0.8, 0.8, 16), atol=0.04), means


def test_gif_reads_with_its_frame_rate(tmp_path):
    path = tmp_path / "ramp.gif"
    write_video(path, _ramp_video(6, 16, 16), fps=10)
    frames, fps = read_frames(path)
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(10.0, rel=0.05)


def test_fps_resampling_keeps_duration(mp4):
    video = read_video(mp4, fps=8)  # 16 frames at 16 fps -> 8 frames at 8 fps (every other frame)
    assert video.shape[1] == 8
    means = video.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.linspace(-0.8, 0.8, 16)[::2], atol=0.04)


def test_resample_indices_nearest_frames():
    assert resample_indices(10, 30.0, 15.0, None) == [0, 2, 4, 6, 8]
    assert resample_indices(10, 10.0, None, 3) == [0, 1, 2]
    assert resample_indices(4, 10.0, 20.0, None) == [0, 0, 1, 1, 2, 2, 3]  # upsampling repeats frames


def test_odd_size_is_resized_and_centre_cropped(tmp_path):
    path = tmp_path / "odd.gif"
    write_video(path, _ramp_video(3, 33, 47), fps=8)  # distinct frames: gif writers merge equal ones
    assert read_video(path, size=(16, 32)).shape == (3, 3, 16, 32)
    assert read_video(path, multiple=16).shape == (3, 3, 32, 32)  # no size: crop down to a multiple


def test_resize_center_crop_keeps_the_centre():
    video = torch.zeros(1, 1, 8, 16)
    video[..., :, 4:12] = 1.0  # a bright centre band, dark sides
    out = resize_center_crop(video, (8, 8))
    assert out.shape == (1, 1, 8, 8) and bool((out == 1).all())


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")


@pytest.mark.parametrize("content", [b"", b"this is not a video at all" * 10])
def test_unreadable_or_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.mp4"):
        read_video(path)


def test_too_short_for_the_frames_asked(mp4):
    with pytest.raises(ValueError, match="16 frames.*20 are needed"):
        read_video(mp4, frames=20)


def test_frame_smaller_than_a_latent_cell(tmp_path):
    path = tmp_path / "tiny.gif"
    write_video(path, torch.zeros(3, 2, 8, 8), fps=8)
    with pytest.raises(ValueError, match="smaller than one latent cell"):
        read_video(path, multiple=16)


def test_size_not_a_multiple_is_refused(mp4):
    with pytest.raises(ValueError, match="not a positive multiple of 16"):
        read_video(mp4, size=(30, 48), multiple=16)
