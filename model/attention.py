"""Scaled dot-product attention with an optional window centred on the query.

One function, `attention(q, k, v, *, mask=None, window=None)`, on (B, heads, L, hd) tensors. Backends:
- full attention (no window, or a window that covers the whole sequence): torch SDPA;
- window on CUDA with flash-attn installed, bf16/fp16 inputs and no extra mask: flash-attn's
  `window_size=(window // 2, window // 2)`;
- window on CUDA otherwise (no extra mask, at least FLEX_MIN_TOKENS tokens): FlexAttention with a
  block-sparse band, compiled to one fused kernel that skips the blocks outside the band;
- window anywhere else: the same band as an explicit boolean mask through SDPA (exact, O(L^2) mask memory).
No path silently drops the window.

Window convention: query i attends key j iff |i - j| <= window // 2 over the flattened token order
(for video: (T, H, W) row-major), so an even window N covers N + 1 tokens, as flash-attn counts it.
"""

from __future__ import annotations

import importlib.util
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

# Below this many tokens the band mask is small and SDPA beats FlexAttention's kernel (H100, bf16, fwd+bwd:
# 1.7x slower at 320 tokens; 2.2x faster at 9216, 3.4x at 32760; benchmarks/bench_dit.py).
FLEX_MIN_TOKENS = 2048


HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def band_mask(length: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) bool, True where |i - j| <= window // 2 (query i may attend key j)."""
    pos = torch.arange(length, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window // 2


@lru_cache(maxsize=4)
def _cached_band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """band_mask built once per (length, window, device): every block of a forward pass shares it. Made
    outside inference mode so it also serves later training steps; read-only."""
    with torch.inference_mode(False):
        return band_mask(length, window, device)


@torch.compiler.disable  # in a compiled block Dynamo would trace through the cache, rebuilding it every call
@lru_cache(maxsize=4)
def _cached_block_mask(length: int, window: int, device: torch.device):
    """FlexAttention's block-sparse form of band_mask: blocks wholly outside the band are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    half = window // 2

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= half

    with torch.inference_mode(False):
        return create_block_mask(band, None, None, length, length, device=device)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """The band through FlexAttention: compiled on CUDA (a fused kernel; inside a compiled block the block's
    own compilation fuses it), eager elsewhere (unfused: tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    block = _cached_block_mask(q.shape[2], window, q.device)
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=block)


def _flash_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn wants (B, L, heads, hd)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          window_size=(window // 2, window // 2))
    return out.transpose(1, 2)  # (B, heads, L, hd)


def window_backend(q: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """The path a window takes for these queries (module doc): "flash-attn", "FlexAttention" or
    "masked SDPA"."""
    if q.is_cuda and mask is None:
        if q.dtype in (torch.float16, torch.bfloat16) and HAS_FLASH_ATTN:
            return "flash-attn"
        if q.shape[2] >= FLEX_MIN_TOKENS:
            return "FlexAttention"
    return "masked SDPA"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q (B, heads, Lq, hd), k and v (B, heads, Lk, hd) -> (B, heads, Lq, hd).

    mask: bool, broadcastable to (B, heads, Lq, Lk), True = attend. A query row with no key to attend
    gives NaN (as in SDPA); callers must keep at least one real key per row.
    window: tokens centred on the query (self-attention only, Lq == Lk); None = full attention.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants (B, heads, L, hd) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}; use mask.bool()")
    lq, lk = q.shape[2], k.shape[2]
    if window is not None:
        if window <= 0:
            raise ValueError(f"attention window must be a positive token count or None, got {window}")
        if lq != lk:
            raise ValueError(f"a centred window needs self-attention (Lq == Lk), got Lq {lq}, Lk {lk}; "
                             "pass window=None for cross-attention")
        if window // 2 >= lk - 1:  # the band covers every pair: full attention is the exact answer
            window = None
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    backend = window_backend(q, mask)
    if backend == "flash-attn":
        return _flash_window(q, k, v, window)
    if backend == "FlexAttention":
        return _flex_window(q, k, v, window)
    band = _cached_band(lq, window, q.device)  # (L, L)
    mask = band if mask is None else mask & band
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


__all__ = ["attention", "band_mask", "window_backend"]
