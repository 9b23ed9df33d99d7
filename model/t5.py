"""T5 / umT5 text encoder (encoder stack only).

One module serves both families, chosen by `T5Config`:
- T5 v1.1 and umT5: gated-GELU feed-forward, GELU with the tanh approximation (HF "gelu_new");
  original T5: ReLU feed-forward (`cfg.ffn`).
- T5: one relative position bias table, computed once and shared by every layer (`pos_embedding`);
  umT5: every block owns its own table (`blocks.{i}.pos_embedding`, `cfg.per_layer_position_bias`).

Conventions that converted weights depend on:
- Attention logits are NOT scaled by 1/sqrt(head_dim): T5 folds that scale into the weights.
- The relative position is key_position - query_position (see `relative_position_bucket`).
- RMSNorm has no mean subtraction and no bias; the variance is accumulated in fp32.
- Module names mirror Wan 2.1's original umT5 checkpoint (`token_embedding`, `blocks.{i}.attn.q`,
  `blocks.{i}.ffn.gate.0`, ..., `norm`), so that checkpoint loads with an identity key map; the map
  from transformers' names lives in `weights/t5.py`.

Shapes: B batch, L tokens, D model width, N heads, C head channels, F feed-forward width.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import T5Config


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """Map relative positions (key_pos - query_pos, any integer tensor) to bucket ids in [0, num_buckets).

    Mesh-TensorFlow / T5 convention. Bidirectional (encoder): half the buckets for keys at or before the
    query, half (offset by num_buckets // 2) for keys after it. Within a half, the first `max_exact`
    distances get one bucket each, then logarithmically wider buckets up to `max_distance`; every
    distance >= max_distance shares the last bucket. Unidirectional (decoder): only keys at or before
    the query are distinguished; keys after it fall in bucket 0.
    """
    rel = relative_position.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        distance = rel.abs()
    else:
        distance = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only avoids log(0); those distances take the exact branch below anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RMSNorm(nn.Module):
    """T5's layer norm: x / rms(x) * weight, no mean subtraction, no bias, variance in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head), added to the attention logits (bidirectional)."""

    def __init__(self, num_buckets: int, heads: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # (Lq, Lk): key - query
        buckets = relative_position_bucket(rel, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, N, L, L)


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias and no logit scaling (T5 convention)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.o = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), bias (1, N, L, L) position bias, mask (B, L) bool, True = real key."""
        B, L, _ = x.shape
        shape = (B, L, self.heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, N, L, C)
        # Padded keys get the most negative finite logit of the compute dtype (-inf would turn a fully
        # padded row into NaN); exp() of it underflows to exactly 0, so they carry no weight.
        bias = bias.to(q.dtype).masked_fill(~mask[:, None, None, :], torch.finfo(q.dtype).min)  # (B, N, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, N, L, C)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """Gated-GELU: fc2(fc1(x) * gelu_tanh(gate(x))) (T5 v1.1 / umT5); ReLU: fc2(relu(fc1(x))) (T5).

    Names follow Wan: `gate.0` is HF's `wi_0` (the activated branch), `fc1` is `wi_1` (or `wi` for ReLU),
    `fc2` is `wo`.
    """

    def __init__(self, dim: int, ffn_dim: int, kind: str):
        super().__init__()
        self.gated = kind == "gated-gelu"
        if self.gated:
            self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x) * self.gate(x) if self.gated else F.relu(self.fc1(x))
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.head_dim)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.ffn)
        self.pos_embedding = (
            RelativePositionBias(cfg.rel_buckets, cfg.heads, cfg.rel_max_distance)
            if cfg.per_layer_position_bias else None
        )

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        # umT5: this layer's own table; T5: the table computed once by the encoder.
        bias = self.pos_embedding(x.shape[1]) if self.pos_embedding is not None else shared_bias
        x = x + self.attn(self.norm1(x), bias, mask)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """Token ids (B, L) long and a key mask (B, L) bool, True = real token -> embeddings (B, L, D).

    Runs in the weights' dtype with fp32 norm statistics; there is no fp16 overflow clamp (use fp32
    or bf16). Outputs at padded positions are set to zero, as Wan feeds its DiT (it trims each prompt to its
    length and zero-pads); padded tokens never influence real positions.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = (
            None if cfg.per_layer_position_bias
            else RelativePositionBias(cfg.rel_buckets, cfg.heads, cfg.rel_max_distance)
        )
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        # zero init: a fresh encoder computes what it would without it, and positions never trained stay 0
        self.abs_pos = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim)) if cfg.abs_pos else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L = ids.shape
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=ids.device)
        if mask.shape != ids.shape:
            raise ValueError(f"T5 mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
        mask = mask.bool()
        x = self.token_embedding(ids)  # (B, L, D)
        if self.abs_pos is not None:
            if L > self.cfg.max_length:
                raise ValueError(f"{L} tokens exceed the T5's {self.cfg.max_length} absolute positions; "
                                 f"truncate prompts to T5Config.max_length")
            x = x + self.abs_pos[:L].to(x.dtype)
        shared_bias = self.pos_embedding(L) if self.pos_embedding is not None else None  # (1, N, L, L)
        for block in self.blocks:
            x = block(x, shared_bias, mask)
        x = self.norm(x)
        return x * mask[..., None].to(x.dtype)

    def resize_token_embeddings(self, n: int) -> None:
        """Grow the input embedding to n rows; new rows are zero (the paper starts [v], [u] at zero).

        Only appended rows are zeroed: give added tokens ids >= the current row count (for umT5, whose
        table is larger than its tokenizer, see `Tokenizer(first_added_id=...)`).
        """
        old = self.token_embedding.weight
        rows = old.shape[0]
        if n < rows:
            raise ValueError(f"cannot shrink the T5 token embedding from {rows} to {n} rows; "
                             f"pass n >= {rows}")
        if n == rows:
            return
        new = torch.cat([old.detach(), old.new_zeros(n - rows, old.shape[1])], dim=0)
        self.token_embedding = nn.Embedding.from_pretrained(new, freeze=not old.requires_grad)
        self.cfg = dataclasses.replace(self.cfg, vocab_size=n)


__all__ = ["T5Encoder", "relative_position_bucket", "RMSNorm"]
