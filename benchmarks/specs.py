"""Benchmark sizes, shared by every script so they all measure the same shapes.

DiT sizes are Wan-shaped (the shared modulation table, RMS QK-norm across heads, text projection,
Wan's RoPE split) so the same config runs in ours and in diffusers' WanTransformer3DModel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import PRESETS, DiTConfig, VAEConfig


@dataclass(frozen=True)
class DiTSize:
    layers: int
    dim: int
    heads: int
    latent: tuple[int, int, int]  # latent grid (T', H', W'); tokens = T' * H'/2 * W'/2 with patch 1x2x2
    text_len: int = 64
    text_dim: int = 256
    batch: int = 1

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)


DIT_SIZES = {
    "small": DiTSize(layers=4, dim=128, heads=2, latent=(5, 16, 16)),  # 320 tokens
    "large": DiTSize(layers=6, dim=256, heads=4, latent=(5, 32, 32)),  # 1280 tokens
    # GPU: two blocks of Wan 2.1 1.3B at its real shape (81 frames 480x832: 32,760 tokens, 512 text tokens)
    "gpu": DiTSize(layers=2, dim=1536, heads=12, latent=(21, 60, 104), text_len=512, text_dim=4096),
}


def dit_config(size: DiTSize) -> DiTConfig:
    """Wan 2.1's block structure at a benchmark size (FFN 4x)."""
    return DiTConfig(
        in_channels=16,
        out_channels=16,
        dim=size.dim,
        heads=size.heads,
        layers=size.layers,
        ffn_dim=4 * size.dim,
        text_dim=size.text_dim,
        text_proj=True,
        modulation="shared",
        qk_norm="rms_across_heads",
        cross_attn_norm=True,
        rope_split=None,
        window=None,
        self_cond=False,
    )


def diffusers_dit_kwargs(cfg: DiTConfig) -> dict:
    """WanTransformer3DModel arguments for the same network (the converters map one onto the other)."""
    return dict(
        patch_size=cfg.patch,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=1024,
    )


def dit_inputs(size: DiTSize, device: torch.device | str, seed: int = 0):
    """(x (B, 16, T', H', W'), t (B,) in [0, 1], context (B, N, text_dim)) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size.batch, 16, *size.latent, generator=g)
    t = torch.rand(size.batch, generator=g)
    context = torch.randn(size.batch, size.text_len, size.text_dim, generator=g)
    return x.to(device), t.to(device), context.to(device)


@dataclass(frozen=True)
class VAESize:
    base: int
    mult: tuple[int, ...]
    res_blocks: int
    video: tuple[int, int, int]  # (frames, H, W)


VAE_SIZES = {
    "small": VAESize(base=16, mult=(1, 2, 4, 4), res_blocks=1, video=(9, 64, 64)),
    "large": VAESize(base=32, mult=(1, 2, 4, 4), res_blocks=2, video=(17, 128, 128)),
    "gpu": VAESize(base=96, mult=(1, 2, 4, 4), res_blocks=2, video=(17, 480, 832)),  # Wan 2.1's, real size
}


def diffusers_vae_kwargs(size: VAESize) -> dict:
    """AutoencoderKLWan arguments: Wan 2.1's layout (4x8x8, 16 latent channels) at a smaller width."""
    return dict(
        base_dim=size.base,
        z_dim=16,
        dim_mult=list(size.mult),
        num_res_blocks=size.res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def wan_vae_config() -> VAEConfig:
    return PRESETS["wan2.1-1.3b"].vae
