"""The analytic DiT FLOP estimate against torch's FLOP counter on a real (tiny) DiT."""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import PRESETS
from model.flops import dit_forward_flops, dit_frozen_step_flops, dit_train_flops

TINY = PRESETS["tiny"].dit


def _plain_attention(q, k, v, *, mask=None, window=None):
    """Attention as explicit matmuls, so FlopCounterMode sees them (it does not count CPU SDPA)."""
    assert window is None
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("variant", [
    {},  # tiny preset: shared modulation, text projection, self-conditioning
    {"modulation": "per_block", "text_proj": False, "self_cond": False, "text_dim": 48},
    {"head_hidden": 48},
])
def test_forward_flops_equal_flop_counter(monkeypatch, variant):
    dit_module = pytest.importorskip("model.dit")
    monkeypatch.setattr(dit_module, "attention", _plain_attention)
    cfg = dataclasses.replace(TINY, **variant)
    model = dit_module.DiT(cfg).eval()
    x, text = torch.randn(1, cfg.in_channels, 3, 8, 8), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1), text)
    tokens = 3 * 4 * 4
    assert counter.get_total_flops() == dit_forward_flops(cfg, tokens, 7)


def test_frozen_step_flops_bound_the_flop_counter(monkeypatch):
    """A LoRA-style step: every weight frozen, gradients flow to the input only. The estimate counts
    the input gradient of every product and both gradients of attention's: an upper bound that the
    counted FLOPs reach within the text side's share."""
    dit_module = pytest.importorskip("model.dit")
    monkeypatch.setattr(dit_module, "attention", _plain_attention)
    cfg = dataclasses.replace(TINY, self_cond=False)
    model = dit_module.DiT(cfg).requires_grad_(False)
    torch.nn.init.normal_(model.head.head.weight)
    x = torch.randn(1, cfg.in_channels, 5, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1), torch.randn(1, 7, cfg.text_dim)).square().sum().backward()
    estimate = dit_frozen_step_flops(cfg, 5 * 8 * 8, 7)
    assert 0.95 * estimate < counter.get_total_flops() <= estimate


def test_window_removes_exactly_the_masked_scores():
    full, windowed = TINY, dataclasses.replace(TINY, window=10)  # a window of 10 covers 11 keys
    saved = dit_forward_flops(full, 48, 7) - dit_forward_flops(windowed, 48, 7)
    assert saved == TINY.layers * 4 * 48 * (48 - 11) * TINY.dim
    assert dit_forward_flops(dataclasses.replace(TINY, window=1000), 48, 7) == dit_forward_flops(full, 48, 7)


def test_train_step_is_three_forwards():
    assert dit_train_flops(TINY, 48, 7) == 3 * dit_forward_flops(TINY, 48, 7)


def test_paper_preset_train_flops_order_of_magnitude():
    # 11.5B params x 9216 tokens x 6 is ~6.4e14; attention adds, the embeddings' params subtract.
    flops = dit_train_flops(PRESETS["paper"].dit, 9216, 512)
    assert 4e14 < flops < 8e14


def test_rejects_empty_input():
    with pytest.raises(ValueError, match="tokens"):
        dit_forward_flops(TINY, 0, 7)
