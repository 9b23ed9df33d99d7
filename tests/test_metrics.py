"""Metrics any base uses (sample/metrics.py), on toy-world clips as data: MSE and its floor, TC, a
missing external model or object instrument is "not available"."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sample import metrics as M


def test_clip_t_and_arcface_are_not_available_without_a_scorer(toy_clip):
    s = M.score_video(toy_clip.video, toy_clip.video, prompt="a circle")
    assert s["clip_t"] == M.NOT_AVAILABLE and s["arcface"] == M.NOT_AVAILABLE
    scored = M.score_video(toy_clip.video, toy_clip.video, prompt="a circle",
                           clip_scorer=lambda frames, text: 0.31)
    assert scored["clip_t"] == 0.31


def test_real_footage_gets_no_object_instruments(toy_clip):
    s = M.score_video(toy_clip.video, toy_clip.video)
    assert s["mse"] == 0.0 and isinstance(s["temporal_coherence"], float)
    assert all(s[k] == M.NOT_AVAILABLE for k in (*M.OBJECT_KEYS, *M.MOTION_KEYS))


def test_model_tensor_layout_scores_like_uint8(toy_clip):
    video = toy_clip.video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1  # (3, T, H, W) in [-1, 1]
    s = M.score_video(video, toy_clip.video)
    assert s["mse"] < 1e-10 and s["temporal_coherence"] == pytest.approx(s["reference_coherence"], abs=1e-6)


def test_table_and_json_are_readable(toy_clip):
    s = {"a": 1.0, "b": float("nan"), "c": M.NOT_AVAILABLE}
    assert json.loads(M.to_json(s)) == {"a": 1.0, "b": None, "c": "not available"}
    table = M.format_table({"copy": s})
    assert table.splitlines()[0] == "| video | a | b | c |"
    assert table.splitlines()[2] == "| copy | 1 | nan | not available |"
