"""The toy world's object metrics (toyworld/metrics.py): a perfect copy scores perfect, a frame-shuffled
copy scores bad motion, an edit is counted attribute by attribute."""

from __future__ import annotations

import numpy as np
import pytest

from sample import metrics as M
from toyworld import metrics as T
from toyworld.world import BACKGROUNDS, COLOURS


def shuffled(video: np.ndarray) -> np.ndarray:
    order = np.random.default_rng(0).permutation(len(video))
    assert (order != np.arange(len(video))).mean() > 0.8
    return video[order]


def test_perfect_copy_scores_perfect(toy_clip):
    s = T.score_toy_video(toy_clip.video, toy_clip.video)
    assert s["mse"] == 0.0 and s["mse_floor"] > 0.01
    assert s["id"] == pytest.approx(1.0) and s["id_crop"] == pytest.approx(1.0)
    assert s["motion_fidelity"] == pytest.approx(1.0) and s["trajectory_error"] == 0.0
    assert s["centre_floor"] > 2.0
    assert s["temporal_coherence"] == pytest.approx(s["reference_coherence"])


def test_shuffled_frames_score_bad_motion_but_same_identity(toy_clip):
    perfect = T.score_toy_video(toy_clip.video, toy_clip.video)
    s = T.score_toy_video(shuffled(toy_clip.video), toy_clip.video)
    assert s["motion_fidelity"] < 0.5, s["motion_fidelity"]
    assert s["trajectory_error"] > 0.5 * s["centre_floor"]
    assert s["temporal_coherence"] < perfect["temporal_coherence"] - 0.2
    assert s["id"] == pytest.approx(1.0)  # the same pixels, only reordered: appearance is unchanged


def test_model_tensor_layout_scores_like_uint8(toy_clip):
    video = toy_clip.video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1  # (3, T, H, W) in [-1, 1]
    s = T.score_toy_video(video, toy_clip.video)
    assert s["mse"] < 1e-10 and s["motion_fidelity"] == pytest.approx(1.0)


def test_edit_adherence_counts_what_was_asked(toy_clip):
    obj = toy_clip.objects[0]
    asked = {"background": toy_clip.background, "colour": obj.colour, "shape": obj.shape,
             "motion": obj.motion}
    assert T.edit_adherence(toy_clip.video, asked, BACKGROUNDS, COLOURS)["edit_adherence"] == 1.0
    other = next(b for b in BACKGROUNDS if b != toy_clip.background)
    s = T.edit_adherence(toy_clip.video, {"background": other, "shape": obj.shape}, BACKGROUNDS, COLOURS)
    assert s == {"edit_adherence": 0.5, "edit_background": 0.0, "edit_shape": 1.0}


def test_edit_adherence_refuses_unknown_attributes(toy_clip):
    with pytest.raises(ValueError, match="size"):
        T.edit_adherence(toy_clip.video, {"size": "big"}, BACKGROUNDS, COLOURS)


def test_different_length_reference_leaves_frame_metrics_not_available(toy_clip):
    s = T.score_toy_video(toy_clip.video[:9], toy_clip.video)
    assert s["mse"] == M.NOT_AVAILABLE and s["motion_fidelity"] == M.NOT_AVAILABLE
    assert isinstance(s["id"], float)
