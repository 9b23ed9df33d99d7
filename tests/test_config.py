"""The model config's one rule for clip shapes (ModelConfig.latent_shape and friends)."""

from __future__ import annotations

import pytest

from model.config import PRESETS, parse_size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_default_clip_is_valid(name):
    cfg = PRESETS[name]
    frames, h, w = cfg.default_clip
    c, t, lh, lw = cfg.latent_shape(frames, (h, w))
    assert c == cfg.vae.latent_channels and t == 1 + (frames - 1) // cfg.vae.time_compression
    assert (lh, lw) == (h // cfg.vae.space_compression, w // cfg.vae.space_compression)


def test_tiny_world_clip_is_80_tokens():
    assert PRESETS["tiny"].token_grid(17, (64, 64)) == (5, 4, 4)


def test_token_grid_beyond_the_learned_positions_is_refused():
    with pytest.raises(ValueError, match=r"token grid \(5, 4, 16\) larger than base tiny"):
        PRESETS["tiny"].latent_shape(17, (64, 256))


@pytest.mark.parametrize(("available", "longest"), [(13, 13), (16, 13), (200, 81), (4, 1)])
def test_longest_clip_is_the_longest_valid_length(available, longest):
    assert PRESETS["wan2.1-1.3b"].longest_clip(available) == longest


def test_size_text():
    assert parse_size("480x832") == (480, 832)
    with pytest.raises(ValueError, match="HxW"):
        parse_size("480 by 832")
