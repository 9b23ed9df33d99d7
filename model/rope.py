"""3D rotary position embedding (RoPE) over a (T, H, W) token grid, Wan 2.1's convention.

- Head channels are split into three contiguous groups (dt, dh, dw) for the t, h and w axes
  (DiTConfig.rope_axes: Wan d - 4*(d//6), 2*(d//6), 2*(d//6); the paper 2:1:1).
- Pairing: INTERLEAVED. Channels (2i, 2i+1) of a head form one complex number x[2i] + 1j * x[2i+1],
  rotated by angle pos * theta ** (-2i' / d_axis), where i' indexes the pair inside its axis group.
  (Not the half-split "rotate_half" convention of GPT-NeoX/Llama.)
- Angles and their cos/sin are computed in float64; the rotation itself runs in float32 and the result
  is cast back to the input dtype (a precision island).
- `rope_table` is what the DiT uses: rope_3d rounded once to complex64, cached per (grid, axes, theta,
  device), so a forward pass builds no table and converts none (the values equal rope_3d's).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def rope_1d(positions: int, dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(positions, dim // 2) float64 angles pos * theta ** (-2i / dim)."""
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even channel count, got {dim}")
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv)


def rope_3d(
    grid: tuple[int, int, int],
    axes: tuple[int, int, int],
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotations for tokens of a (T, H, W) grid in row-major order -> (T*H*W, hd // 2) complex128.

    Token (t, h, w) gets the t-axis angles of t in its first dt // 2 pairs, then the h-axis angles,
    then the w-axis angles (hd = dt + dh + dw).
    """
    t, h, w = grid
    at, ah, aw = (rope_1d(n, d, theta, device) for n, d in zip(grid, axes, strict=True))
    angles = torch.cat([
        at[:, None, None, :].expand(t, h, w, -1),
        ah[None, :, None, :].expand(t, h, w, -1),
        aw[None, None, :, :].expand(t, h, w, -1),
    ], dim=-1).reshape(t * h * w, -1)  # (L, hd/2)
    return torch.polar(torch.ones_like(angles), angles)


@lru_cache(maxsize=16)
def rope_table(
    grid: tuple[int, int, int],
    axes: tuple[int, int, int],
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """rope_3d(grid, axes, theta) as complex64 on `device`, computed once per argument set.

    Built outside inference mode, so a table first made under `torch.inference_mode()` still serves
    a later training step; nothing may write into it (apply_rope only reads it).
    """
    with torch.inference_mode(False), torch.no_grad():
        return rope_3d(tuple(grid), tuple(axes), theta, device).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, hd) -> x rotated, same dtype. freqs: (L, hd // 2) complex from rope_3d / rope_table,
    or the same as real (L, hd // 2, 2) (cos, sin) pairs, `torch.view_as_real(rope_table(...))`.

    Eager: one complex64 multiply (the fastest form on the CPU). Under torch.compile the same products
    in real arithmetic, which inductor fuses (it generates no code for complex operators; the DiT
    hands its blocks the real form so no complex tensor enters a compiled graph).
    """
    if torch.compiler.is_compiling():
        return _rotate_real(x, freqs)
    if not freqs.is_complex():
        freqs = torch.view_as_complex(freqs.float())
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, heads, L, hd/2)
    return torch.view_as_real(pairs * freqs.to(torch.complex64)).flatten(-2).type_as(x)


def _rotate_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(a + ib)(c + id) = (ac - bd) + i(ad + bc), pair by pair, in fp32."""
    cs = torch.view_as_real(freqs.to(torch.complex64)) if freqs.is_complex() else freqs.float()
    # cs: (L, hd/2, 2)
    c, d = cs[..., 0], cs[..., 1]
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, L, hd/2) each
    return torch.stack([a * c - b * d, a * d + b * c], dim=-1).flatten(-2).type_as(x)


__all__ = ["rope_1d", "rope_3d", "rope_table", "apply_rope"]
