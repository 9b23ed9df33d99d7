"""3D RoPE: Wan's interleaved pairing, the axis split, and relativity of q.k scores."""

from __future__ import annotations

import math

import torch

from model.config import DiTConfig
from model.rope import apply_rope, rope_3d

GRID, AXES = (5, 6, 7), (8, 4, 4)  # head_dim 16


def index(t, h, w, grid=GRID):
    return (t * grid[1] + h) * grid[2] + w


def score(q, k, pq, pk, freqs):
    """q.k after rotating q at grid position pq and k at pk; q, k are (hd,) vectors."""
    rq = apply_rope(q[None, None, None], freqs[index(*pq)][None])  # (1, 1, 1, hd)
    rk = apply_rope(k[None, None, None], freqs[index(*pk)][None])
    return (rq * rk).sum().item()


def test_scores_depend_only_on_relative_position():
    freqs = rope_3d(GRID, AXES)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64).float(), torch.randn(16, generator=g).float()
    base = score(q, k, (0, 1, 2), (2, 0, 5), freqs)
    for shift in [(1, 0, 0), (0, 3, 0), (0, 0, 1), (2, 2, 1)]:
        pq = tuple(a + s for a, s in zip((0, 1, 2), shift, strict=True))
        pk = tuple(a + s for a, s in zip((2, 0, 5), shift, strict=True))
        assert abs(score(q, k, pq, pk, freqs) - base) < 1e-4
    # ...and the score does change with the relative offset (the test can fail).
    assert abs(score(q, k, (0, 1, 2), (3, 0, 5), freqs) - base) > 1e-3


def test_pairing_is_interleaved_with_axis_groups():
    """Channels (2i, 2i+1) form one complex pair; pairs 0..dt/2-1 rotate with t, then h, then w."""
    freqs = rope_3d(GRID, AXES)
    assert freqs.dtype == torch.complex128 and freqs.shape == (5 * 6 * 7, 8)
    pos, theta = (3, 2, 5), 10000.0
    for channel, axis, pair_in_axis, d_axis in [(0, 0, 0, 8), (2, 0, 1, 8), (8, 1, 0, 4), (14, 2, 1, 4)]:
        x = torch.zeros(1, 1, 1, 16)
        x[..., channel] = 1.0  # real part of one pair
        out = apply_rope(x, freqs[index(*pos)][None])[0, 0, 0]
        angle = pos[axis] * theta ** (-2 * pair_in_axis / d_axis)
        expected = torch.zeros(16)
        expected[channel], expected[channel + 1] = math.cos(angle), math.sin(angle)
        assert torch.allclose(out, expected, atol=1e-6), (channel, out, expected)


def test_wan_axis_split():
    assert DiTConfig(dim=1536, heads=12).rope_axes == (44, 42, 42)  # head_dim 128
    assert DiTConfig(dim=24, heads=2).rope_axes == (4, 4, 4)  # head_dim 12


def test_rotation_keeps_dtype_and_norm():
    x = torch.randn(2, 3, 5 * 6 * 7, 16, dtype=torch.bfloat16)
    out = apply_rope(x, rope_3d(GRID, AXES))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2)
