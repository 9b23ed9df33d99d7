"""Analytic FLOP estimate of the DiT, from its config alone (no model is built).

A multiply-add counts as 2 FLOPs; only matrix products are counted (norms, RoPE, activations,
softmax and modulation arithmetic are O(L * D) and left out). Per sample, with L video tokens,
S text tokens, D = dim, F = ffn_dim, N = layers, W = min(L, 2 * (window // 2) + 1) keys per
query (model/attention.py: query i sees keys |i - j| <= window // 2; near the ends of the sequence
fewer keys exist, so this is an upper bound), K = D if text_proj else text_dim (the width that
cross-attention k, v read):

    per block   self-attn  q, k, v, o          2 * 4 D^2 * L
                self-attn  scores + values     4 * L * W * D
                cross-attn q, o                2 * 2 D^2 * L
                cross-attn k, v (text tokens)  2 * 2 K D * S
                cross-attn scores + values     4 * L * S * D
                FFN                            2 * 2 D F * L
    once        patch embedding (x2 with self-conditioning's twin input)  2 * C p D * L
                head                           2 * D * C_out p * L  (+ 2 * (D H + H C_out p) * L with
                                               a head MLP of width H, head_hidden)
                text projection (text_proj)    2 * (text_dim D + D^2) * S
                time embedding                 2 * (freq_dim D + D^2)
                modulation (per sample)        2 * 6 D^2 ("shared") or N * 2 * 6 D^2 ("per_block")

    forward = N * block + once;   train step = 3 * forward (forward + backward, backward ~ 2x).

A LoRA step through a frozen base (dit_frozen_step_flops) differs: a product with a frozen weight needs
only its input gradient (1x its forward), attention's products (both operands activations) need both
(2x). So it is 2 * forward + the attention part (an upper bound: products on the text side, whose inputs
need no gradient, are counted too; they are under 1% at real sizes).

The train figure leaves out self-conditioning's extra no-grad forward (taken in a fraction of
steps during pretraining) and activation recomputation (gradient checkpointing adds ~1 forward).
"""

from __future__ import annotations

import math

from model.config import DiTConfig


def dit_forward_flops(cfg: DiTConfig, tokens: int, text_len: int) -> int:
    """FLOPs of one DiT forward pass for ONE sample of `tokens` video and `text_len` text tokens."""
    if tokens < 1 or text_len < 0:
        raise ValueError(f"need tokens >= 1 and text_len >= 0, got tokens={tokens}, text_len={text_len}")
    d, f, n_layers, L, S = cfg.dim, cfg.ffn_dim, cfg.layers, tokens, text_len
    k = d if cfg.text_proj else cfg.text_dim
    block = (  # the products with a weight; attention's scores and values: dit_attention_flops
        2 * 4 * d * d * L  # self-attention projections
        + 2 * 2 * d * d * L  # cross-attention q, o
        + 2 * 2 * k * d * S  # cross-attention k, v over the text tokens
        + 2 * 2 * d * f * L  # FFN up and down
    )
    p = math.prod(cfg.patch)
    n_inputs = 2 if cfg.self_cond else 1
    once = (
        n_inputs * 2 * cfg.in_channels * p * d * L  # patch embedding(s)
        + 2 * d * cfg.out_channels * p * L  # head
        + (2 * (d + cfg.out_channels * p) * cfg.head_hidden * L if cfg.head_hidden else 0)  # head MLP
        + (2 * (cfg.text_dim * d + d * d) * S if cfg.text_proj else 0)
        + 2 * (cfg.freq_dim * d + d * d)  # time embedding MLP
        + (n_layers if cfg.modulation == "per_block" else 1) * 2 * 6 * d * d  # modulation projection(s)
    )
    return n_layers * block + dit_attention_flops(cfg, tokens, text_len) + once


def dit_attention_flops(cfg: DiTConfig, tokens: int, text_len: int) -> int:
    """The attention part of dit_forward_flops: scores and values of self- and cross-attention, all blocks."""
    d, L, S = cfg.dim, tokens, text_len
    w = L if cfg.window is None else min(L, 2 * (cfg.window // 2) + 1)
    return cfg.layers * (4 * L * w * d + 4 * L * S * d)


def dit_frozen_step_flops(cfg: DiTConfig, tokens: int, text_len: int) -> int:
    """FLOPs of forward + backward through a frozen DiT for ONE sample (a LoRA step; the LoRA's own small
    products left out): see the module docstring."""
    return 2 * dit_forward_flops(cfg, tokens, text_len) + dit_attention_flops(cfg, tokens, text_len)


def dit_train_flops(cfg: DiTConfig, tokens: int, text_len: int) -> int:
    """FLOPs of one training step for ONE sample: 3 x forward (forward + backward at 2x forward)."""
    return 3 * dit_forward_flops(cfg, tokens, text_len)
