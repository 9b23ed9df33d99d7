"""attention(): SDPA, the exact windowed path, and masks, against attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.attention import _flex_window, attention, band_mask


def brute_force(q, k, v, window=None, key_mask=None):
    """Attention by hand: scores, a per-pair mask built from explicit loops, softmax, weighted sum."""
    b, h, lq, hd = q.shape
    lk = k.shape[2]
    allowed = torch.ones(b, lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            if window is not None and abs(i - j) > window // 2:
                allowed[:, i, j] = False
            if key_mask is not None:
                allowed[:, i, j] &= key_mask[:, j]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, h, Lq, Lk)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def qkv(b=2, h=3, lq=11, lk=11, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, hd, generator=g), torch.randn(b, h, lk, hd, generator=g),
            torch.randn(b, h, lk, hd, generator=g))


@pytest.mark.parametrize("window", [1, 2, 3, 6, 7, 20, 22, 100])
def test_window_matches_brute_force(window):
    q, k, v = qkv()
    assert torch.allclose(attention(q, k, v, window=window), brute_force(q, k, v, window=window), atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [1, 6, 7, 20])
def test_flex_window_matches_brute_force(window):
    """The CUDA window backend (FlexAttention, block-sparse band), run here unfused (FlexAttention has no
    CPU backward: test_flex_window_cuda checks gradients), at a length not a multiple of its 128 blocks."""
    q, k, v = qkv(lq=150, lk=150, hd=16)
    assert torch.allclose(_flex_window(q, k, v, window), brute_force(q, k, v, window=window), atol=1e-5)


@pytest.mark.slow
def test_flex_window_inside_torch_compile():
    """As in DiT.compile_blocks: the window traced by an outer torch.compile (its block mask built once,
    outside the graph) matches the explicit mask. ~10 s of compilation on the CPU."""
    q, k, v = qkv(b=1, h=2, lq=2100, lk=2100, hd=32)
    compiled = torch.compile(lambda q, k, v: _flex_window(q, k, v, 600))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(2100, 600))
    assert torch.allclose(compiled(q, k, v), ref, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_window_cuda(dtype):
    """The compiled FlexAttention window (attention()'s CUDA path for long sequences): outputs and input
    gradients match the float64 brute force within the dtype's rounding."""
    q, k, v = (x.cuda().to(dtype).requires_grad_() for x in qkv(b=1, h=2, lq=700, lk=700, hd=64))
    out = _flex_window(q, k, v, 300)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = brute_force(q64, k64, v64, window=300)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # relative, by norm
    assert (out.cpu().double() - ref).norm() / ref.norm() < tol
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g.cpu().double() - r).norm() / r.norm() < tol


def test_window_changes_output_when_it_excludes_keys():
    q, k, v = qkv()
    assert (attention(q, k, v, window=4) - attention(q, k, v)).abs().max() > 1e-3


def test_window_with_key_padding_mask():
    q, k, v = qkv()
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[0, 9:] = False  # every query still sees a real key inside its window
    key_mask[1, :2] = False
    out = attention(q, k, v, mask=key_mask[:, None, None, :], window=6)
    assert torch.allclose(out, brute_force(q, k, v, window=6, key_mask=key_mask), atol=1e-5)


def test_cross_attention_mask_matches_brute_force():
    q, k, v = qkv(lq=5, lk=9)
    key_mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    out = attention(q, k, v, mask=key_mask[:, None, None, :])
    assert torch.allclose(out, brute_force(q, k, v, key_mask=key_mask), atol=1e-5)


def test_window_needs_self_attention():
    q, k, v = qkv(lq=5, lk=9)
    with pytest.raises(ValueError, match="Lq == Lk"):
        attention(q, k, v, window=4)


def test_bad_mask_and_window_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, mask=torch.ones(11, 11))
    with pytest.raises(ValueError, match="positive"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="B, heads, L, hd"):
        attention(q[0], k[0], v[0])
