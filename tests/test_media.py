"""Video and contact-sheet files (sample/media.py): what is written reads back with imageio."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sample import media


def moving_bar(frames: int = 5, h: int = 16, w: int = 24) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: a white bar moving right on black, every frame different."""
    video = -torch.ones(3, frames, h, w)
    for i in range(frames):
        video[:, i, :, 2 * i : 2 * i + 4] = 1.0
    return video


def test_to_uint8_maps_the_model_range_onto_0_255():
    video = torch.stack([torch.full((2, 4, 4), v) for v in (-1.0, 0.0, 1.0)])  # (3, T=2, 4, 4)
    frames = media.to_uint8(video)
    assert frames.shape == (2, 4, 4, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0].tolist() == [0, 128, 255]


def test_to_uint8_refuses_a_batch():
    with pytest.raises(ValueError, match="one video"):
        media.to_uint8(torch.zeros(1, 3, 2, 4, 4))


def test_mp4_reads_back_with_every_frame_and_its_size(tmp_path):
    path = media.write_mp4(tmp_path / "v.mp4", moving_bar(), fps=8)
    frames = iio.imread(path, index=None)
    assert frames.shape == (5, 16, 24, 3)
    # lossy, but the bar is where it was drawn (mean abs error well under the 0..255 range)
    assert np.abs(frames.astype(float) - media.to_uint8(moving_bar())).mean() < 12
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_gif_reads_back_exactly(tmp_path):
    path = media.write_gif(tmp_path / "v.gif", moving_bar(), fps=8)
    frames = np.asarray(iio.imread(path, index=None))[..., :3]
    assert frames.shape == (5, 16, 24, 3)
    np.testing.assert_array_equal(frames, media.to_uint8(moving_bar()))


def test_contact_sheet_rows_are_videos_reference_first_columns_frames():
    ref, gen = moving_bar(), -moving_bar()
    sheet = media.contact_sheet([ref, gen])
    pad, h, w = media.SHEET_PAD, 16, 24
    assert sheet.shape == (pad + 2 * (h + pad), pad + 5 * (w + pad), 3)
    for row, video in enumerate((ref, gen)):
        for col in (0, 4):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            np.testing.assert_array_equal(sheet[top : top + h, left : left + w], media.to_uint8(video)[col])


def test_contact_sheet_labels_take_a_strip_with_text(tmp_path):
    sheet = media.contact_sheet([moving_bar()], labels=["reference"])
    strip = sheet[media.SHEET_PAD : media.SHEET_PAD + media.LABEL_HEIGHT]
    assert sheet.shape[0] == 2 * media.SHEET_PAD + media.LABEL_HEIGHT + 16
    assert (strip != media.SHEET_BACKGROUND).any(), "no label drawn"
    path = media.write_contact_sheet(tmp_path / "s.png", [moving_bar()], labels=["reference"])
    np.testing.assert_array_equal(iio.imread(path)[..., :3], sheet)


def test_contact_sheet_columns_pick_frames_evenly():
    assert media.pick_frames(17, 5).tolist() == [0, 4, 8, 12, 16]
    assert media.pick_frames(3, 8).tolist() == [0, 1, 2]
    sheet = media.contact_sheet([moving_bar(frames=9)], columns=3)
    assert sheet.shape[1] == media.SHEET_PAD + 3 * (24 + media.SHEET_PAD)


def test_contact_sheet_refuses_rows_of_different_sizes():
    with pytest.raises(ValueError, match="different frame sizes"):
        media.contact_sheet([moving_bar(h=16), moving_bar(h=32)])
