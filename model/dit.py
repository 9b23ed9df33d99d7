"""Video Diffusion Transformer (paper §8, Table 5; Wan 2.1's block layout).

patchify (Conv3d, 1x2x2) -> blocks [modulated self-attn (QK-norm, 3D RoPE, optional window) with gate;
cross-attn to text tokens; modulated GELU-tanh MLP with gate] -> modulated head -> unpatchify -> velocity.

Module names mirror the ORIGINAL Wan 2.1 checkpoint (see weights/wan_dit.py), so a Wan state dict
loads with an identity key map. Every projection is a plain nn.Linear so LoRA can wrap it by name.

Precision islands (fp32 even under bf16 weights/autocast): the sinusoidal time embedding (float64),
the time MLP, modulation tables and gates, every norm (computed in fp32, returned in the input dtype),
RoPE (float64 tables, fp32 rotation). Everything else runs in the residual stream's dtype.

Shapes: B batch, C latent channels, T/H/W latent grid, L tokens, D model width, N text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .config import DiTConfig
from .flow import velocity_from_x0
from .rope import apply_rope, rope_table

# ---------------------------------------------------------------------------------------- norms


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input dtype (Wan's WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale, computed in fp32 (Wan's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: one fused kernel (the hand-written pow/mean/rsqrt chain cost 6 ops and their backward)
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def qk_norm(kind: str, dim: int, head_dim: int, eps: float) -> nn.Module:
    """Query/key norm. "rms_across_heads" (Wan) normalizes all D channels before the head split
    (weight (D,)); the per-head kinds normalize each head's hd channels (weight (hd,))."""
    if kind == "rms_across_heads":
        return RMSNorm(dim, eps)
    if kind == "rms_per_head":
        return RMSNorm(head_dim, eps)
    if kind == "layer_per_head":
        return LayerNorm(head_dim, eps=eps, elementwise_affine=True)
    return nn.Identity()


# ----------------------------------------------------------------------------------- modulation


@dataclass
class Modulation:
    """adaLN terms of one sub-layer, each (B, 1, D) fp32: x += gate * f(norm(x) * (1 + scale) + shift)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def split_modulation(m: torch.Tensor) -> tuple[Modulation, Modulation]:
    """(B, 6, D), or per token (B, L, 6, D) -> (self-attn, ffn). The ONE place that knows Wan's chunk
    order: shift, scale, gate for self-attention, then shift, scale, gate for the MLP."""
    m = m.float()
    c = (m if m.ndim == 4 else m.unsqueeze(1)).unbind(-2)  # each (B, 1, D), or (B, L, D) per token
    return Modulation(c[0], c[1], c[2]), Modulation(c[3], c[4], c[5])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 island: x * (1 + scale) + shift, returned in x's dtype (one fused addcmul)."""
    return torch.addcmul(shift, x.float(), 1 + scale).type_as(x)


def add_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """fp32 island: residual x + gate * y, returned in x's dtype (one fused addcmul)."""
    return torch.addcmul(x.float(), y.float(), gate).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim) float64 [cos | sin] of t * 10000 ** (-i / (dim/2)) (Wan's order: cos first)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), freqs)  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# ------------------------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Multi-head attention with plain q/k/v/o Linears and QK-norm. Self-attention applies RoPE and the
    window; cross-attention (kv_dim = width of the context) takes a key padding mask."""

    def __init__(self, cfg: DiTConfig, kv_dim: int | None = None, window: int | None = None):
        super().__init__()
        d, kv = cfg.dim, kv_dim or cfg.dim
        self.heads, self.window = cfg.heads, window
        self.norm_across_heads = cfg.qk_norm == "rms_across_heads"
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(kv, d), nn.Linear(kv, d), nn.Linear(d, d)
        self.norm_q = qk_norm(cfg.qk_norm, d, cfg.head_dim, cfg.eps)
        self.norm_k = qk_norm(cfg.qk_norm, d, cfg.head_dim, cfg.eps)
        # Cross-attention: (L, N) bool, which text tokens each video token may read (True = may), on top of
        # the key padding mask; set while regional concepts confine their words (lora/regions.py).
        self.key_mask: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        context: torch.Tensor | None = None,  # (B, N, kv_dim); None = self-attention
        freqs: torch.Tensor | None = None,  # (L, hd/2, 2) RoPE (cos, sin), or (L, hd/2) complex
        mask: torch.Tensor | None = None,  # (B, N) bool, True = real key
    ) -> torch.Tensor:
        src = x if context is None else context
        q, k, v = self.q(x), self.k(src), self.v(src)  # (B, L|N, D)
        if self.norm_across_heads:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, h, L, hd)
        if not self.norm_across_heads:
            q, k = self.norm_q(q), self.norm_k(k)
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        if self.key_mask is not None and context is not None:
            if self.key_mask.shape != (x.shape[1], src.shape[1]):
                raise ValueError(f"key mask {tuple(self.key_mask.shape)} does not fit {x.shape[1]} video and "
                                 f"{src.shape[1]} text tokens")
            km = self.key_mask.to(x.device)[None, None]  # (1, 1, L, N)
            attn_mask = km if attn_mask is None else attn_mask & km
        out = attention(q, k, v, mask=attn_mask, window=self.window)  # (B, h, L, hd)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, L, D)


# ---------------------------------------------------------------------------------------- block


class Block(nn.Module):
    """norm1 -> modulated self-attn (gated); norm3 -> cross-attn (ungated); norm2 -> modulated MLP (gated).
    Names follow Wan 2.1 (norm3 is the affine cross-attention norm, norm2 the MLP's)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg, window=cfg.window)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm \
            else nn.Identity()
        self.cross_attn = Attention(cfg, kv_dim=cfg.dim if cfg.text_proj else cfg.text_dim)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        if cfg.modulation == "shared":  # Wan: learned per-block table added to the shared projection
            self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))
        else:  # DiT adaLN: this block's own projection of silu(time embedding)
            self.adaLN = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        time: torch.Tensor,  # (B, 6, D) shared projection or (B, D) for adaLN; per token (B, L, ...)
        context: torch.Tensor,  # (B, N, D or text_dim)
        freqs: torch.Tensor,  # (L, hd/2, 2) RoPE (cos, sin)
        context_mask: torch.Tensor | None,  # (B, N)
    ) -> torch.Tensor:
        if hasattr(self, "adaLN"):
            m = self.adaLN(F.silu(time.to(self.adaLN.weight.dtype))).unflatten(-1, (6, -1))
        else:
            m = self.modulation.float() + time.float()
        sa, ff = split_modulation(m)
        x = add_gated(x, self.self_attn(modulate(self.norm1(x), sa.shift, sa.scale), freqs=freqs), sa.gate)
        x = x + self.cross_attn(self.norm3(x), context, mask=context_mask)
        return add_gated(x, self.ffn(modulate(self.norm2(x), ff.shift, ff.scale)), ff.gate)


class Head(nn.Module):
    """Wan's output head: LayerNorm (no affine) modulated by head.modulation + e, then Linear to patches."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        out = cfg.out_channels * math.prod(cfg.patch)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        if cfg.head_hidden is not None:  # nonlinear: reaches outside the Linear's dim-wide span
            # fork_rng: nn.Linear's own init would shift the draws of every tensor DiT.init_weights sets
            with torch.random.fork_rng(devices=[]):
                self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.head_hidden), nn.GELU(approximate="tanh"),
                                         nn.Linear(cfg.head_hidden, out))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), e (B, D) time embedding, or (B, L, D) per token -> (B, L, C_out * pt * ph * pw)."""
        mod = self.modulation.float() + e.float().unsqueeze(-2)  # (B, 2, D), or (B, L, 2, D) per token
        shift, scale = (mod if mod.ndim == 4 else mod.unsqueeze(1)).unbind(-2)  # (B, 1 or L, D) each
        x = modulate(self.norm(x), shift, scale)
        out = self.head(x)
        return out + self.mlp(x) if hasattr(self, "mlp") else out


# ------------------------------------------------------------------------------------------ DiT


class DiT(nn.Module):
    """forward(x (B, C, T, H, W), t (B,) in [0, 1], context (B, N, text_dim)) -> velocity like x."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        if cfg.self_cond:
            self.self_cond_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        if cfg.abs_pos is not None:
            self.pos_embedding = nn.Parameter(torch.zeros(*cfg.abs_pos, d))  # (Tmax, Hmax, Wmax, D)
        if cfg.text_proj:
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                                nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        if cfg.modulation == "shared":
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """All initialization lives here (Wan's scheme, plus our extra inputs)."""
        mlp = getattr(self.head, "mlp", None)
        late = set(mlp.modules()) if mlp is not None else set()
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in late:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.patch_embedding,):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        for seq in (getattr(self, "text_embedding", None), self.time_embedding):
            for m in seq.modules() if seq is not None else ():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        std = self.cfg.dim ** -0.5
        for block in self.blocks:
            if hasattr(block, "modulation"):
                nn.init.normal_(block.modulation, std=std)  # Wan: randn / sqrt(D)
            else:
                # adaLN-Zero (DiT): zero shift/scale/gate switch off self-attn and MLP; with the ungated
                # cross-attention's output projection zeroed too (PixArt-alpha), every block starts as
                # the identity map.
                nn.init.zeros_(block.adaLN.weight)
                nn.init.zeros_(block.adaLN.bias)
                nn.init.zeros_(block.cross_attn.o.weight)
        nn.init.normal_(self.head.modulation, std=std)
        # Zero output projection: a fresh model predicts v = 0 everywhere (Wan, DiT).
        nn.init.zeros_(self.head.head.weight)
        if self.cfg.self_cond:
            # Zero self-conditioning input: the previous x0 estimate adds nothing until training learns
            # to use it, so a pretrained base (e.g. Wan) keeps its exact outputs when self-cond is added.
            nn.init.zeros_(self.self_cond_embedding.weight)
            nn.init.zeros_(self.self_cond_embedding.bias)
        if self.cfg.abs_pos is not None:
            # Zero absolute positions: the model starts as pure RoPE and learns what it needs.
            nn.init.zeros_(self.pos_embedding)
        if mlp is not None:
            # On a forked RNG, so every other tensor, here and in modules built after this one, draws
            # what it would in a DiT without the MLP; a zero output layer makes the head start as its
            # Linear alone.
            with torch.random.fork_rng(devices=[]):
                nn.init.xavier_uniform_(mlp[0].weight)
            nn.init.zeros_(mlp[0].bias)
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block in place (regional compilation: one graph serves every layer, so it
        compiles in about the time of one block). Parameter names and the state dict are unchanged.
        An opt-in performance knob; benchmarks/bench_dit.py --compile measures what it buys."""
        for block in self.blocks:
            block.compile(**kwargs)

    # -- helpers ----------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      context_mask: torch.Tensor | None, self_cond: torch.Tensor | None) -> None:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT wants latents (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}; "
                             "check the VAE's latent_channels against DiTConfig.in_channels")
        b, _, *grid = x.shape
        if any(n % p for n, p in zip(grid, cfg.patch, strict=True)):
            raise ValueError(f"latent grid (T, H, W) = {tuple(grid)} is not divisible by patch {cfg.patch}; "
                             "crop or pad the video so each latent size is a multiple of the patch")
        tokens = math.prod(n // p for n, p in zip(grid, cfg.patch, strict=True))
        if t.shape not in ((b,), (b, tokens)):
            raise ValueError(f"t must have shape ({b},) or per token ({b}, {tokens}), got {tuple(t.shape)}; "
                             "pass one flow time per sample (or per token)")
        if t.ndim == 2 and cfg.prediction != "velocity":
            raise ValueError(f"per-token times need a velocity head; this DiT predicts {cfg.prediction!r}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be (B={b}, N, text_dim={cfg.text_dim}), got "
                             f"{tuple(context.shape)}; check T5Config.dim against DiTConfig.text_dim")
        if context_mask is not None:
            if context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
                raise ValueError(f"context_mask must be bool {tuple(context.shape[:2])}, got "
                                 f"{context_mask.dtype} {tuple(context_mask.shape)}")
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("context_mask has a sample with no real token; keep at least one (e.g. EOS)")
        if self_cond is not None:
            if not cfg.self_cond:
                raise ValueError("self_cond given but DiTConfig.self_cond is False; enable it or pass None")
            if self_cond.shape != x.shape:
                raise ValueError(f"self_cond must match x {tuple(x.shape)}, got {tuple(self_cond.shape)}")
        if cfg.abs_pos is not None:
            tokens = tuple(n // p for n, p in zip(grid, cfg.patch, strict=True))
            if any(n > m for n, m in zip(tokens, cfg.abs_pos, strict=True)):
                raise ValueError(f"token grid {tokens} exceeds abs_pos {cfg.abs_pos}; enlarge abs_pos")

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 island: t (B,) -> e (B, D) time embedding, and the blocks' time input: (B, 6, D) shared
        projection ("shared") or e itself ("per_block"). Per token, t (B, L) -> (B, L, D), (B, L, ...)."""
        if t.ndim == 2:  # Wan 2.2 TI2V: each distinct time is embedded once, then gathered per token
            values, index = torch.unique(t, return_inverse=True)
            e, time = self._time(values)
            return e[index], time[index]
        with torch.autocast(device_type=t.device.type, enabled=False):
            w = self.time_embedding[0].weight
            sinusoid = timestep_embedding(t * self.cfg.time_scale, self.cfg.freq_dim)  # (B, freq_dim) float64
            e = self.time_embedding(sinusoid.to(w.dtype)).float()  # (B, D)
            if self.cfg.modulation == "per_block":
                return e, e
            return e, self.time_projection(e.to(w.dtype)).float().unflatten(1, (6, -1))

    def _patchify(self, x: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T, H, W) -> tokens (B, L, D) in (t, h, w) row-major order."""
        h = self.patch_embedding(x)  # (B, D, T', H', W')
        if self.cfg.self_cond:
            prev = torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype)
            h = h + self.self_cond_embedding(prev)
        h = h.flatten(2).transpose(1, 2)  # (B, L, D)
        if self.cfg.abs_pos is not None:
            t, hh, w = (n // p for n, p in zip(x.shape[2:], self.cfg.patch, strict=True))
            h = h + self.pos_embedding[:t, :hh, :w].reshape(1, t * hh * w, -1).to(h.dtype)
        return h.contiguous()

    def _unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, C * pt * ph * pw) -> (B, C, T'*pt, H'*ph, W'*pw)."""
        (t, h, w), (pt, ph, pw) = grid, self.cfg.patch
        y = y.reshape(y.shape[0], t, h, w, pt, ph, pw, -1)
        return y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(y.shape[0], -1, t * pt, h * ph, w * pw)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,  # (B, C, T, H, W) noisy latents x_t
        t: torch.Tensor,  # (B,) flow time in [0, 1] (1 = noise), or (B, L) per token (a clean first frame: 0)
        context: torch.Tensor,  # (B, N, text_dim) text tokens
        context_mask: torch.Tensor | None = None,  # (B, N) bool, True = real; None = attend all (Wan)
        self_cond: torch.Tensor | None = None,  # (B, C, T, H, W) previous x0 estimate; None = zeros
    ) -> torch.Tensor:
        self._check_inputs(x, t, context, context_mask, self_cond)
        cfg = self.cfg
        grid = (x.shape[2] // cfg.patch[0], x.shape[3] // cfg.patch[1], x.shape[4] // cfg.patch[2])
        tokens = self._patchify(x, self_cond)  # (B, L, D)
        e, time = self._time(t)
        context = context.to(tokens.dtype)
        if cfg.text_proj:
            context = self.text_embedding(context)  # (B, N, D)
        # (L, hd/2, 2) fp32 (cos, sin): the cached complex64 table viewed as real (compiled code: no complex)
        freqs = torch.view_as_real(rope_table(grid, cfg.rope_axes, cfg.rope_theta, x.device))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, time, context, freqs, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, time, context, freqs, context_mask)
        out = self._unpatchify(self.head(tokens, e), grid)  # (B, C, T, H, W)
        if cfg.prediction == "x0":  # x0-parametrized head, returned as the velocity it implies
            return velocity_from_x0(x, out, t).to(x.dtype)
        return out.to(x.dtype)


__all__ = ["DiT", "Block", "Attention", "Head", "Modulation", "split_modulation", "modulate", "add_gated",
           "timestep_embedding", "LayerNorm", "RMSNorm", "qk_norm"]
