"""Layers of the causal 3D VAE: causal convs, norms, residual blocks, attention, resamplers.

Every layer maps (B, C, T, H, W) -> (B, C', T', H', W') and is causal in time: output frame t
reads input frames <= t only. Layers that need frames from earlier chunks take an optional
`StreamCache`; with one, feeding a video chunk by chunk gives the same result as feeding it whole
(chunks: first the frames up to and including frame 0's group, then whole groups; see VAE).
Norms act per frame (RMS over channels, or GroupNorm over (C/G, H, W)) so they stay causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StreamCache:
    """State carried between chunks of one streamed video: per layer, the frames it still needs.

    Keys are the layer modules themselves; one cache serves one pass (encode or decode) of one video.
    """

    tails: dict[nn.Module, torch.Tensor] = field(default_factory=dict)


def _pad_mode(padding: str) -> str:
    return {"zeros": "constant", "replicate": "replicate"}[padding]


def conv3d(layer: nn.Conv3d, x: torch.Tensor, padding: tuple[int, int, int] | None = None) -> torch.Tensor:
    """layer(x) (with zero `padding` instead of the layer's own when given), sent to oneDNN (mkldnn) on
    the CPU in fp32. PyTorch's dispatch heuristic sends batch-1
    3D convolutions of small feature maps (N*C*T*H <= 20480) to its unfold + GEMM fallback,
    `slow_conv3d`, measured 2-11x slower than oneDNN at this VAE's sizes; larger maps go to oneDNN
    anyway. Same arithmetic up to fp32 rounding; autograd works through it; other devices, and code
    under torch.compile (dynamo cannot trace this op; inductor picks its own kernel), go the usual way."""
    if layer.padding_mode != "zeros" or not isinstance(layer.padding, tuple):
        raise ValueError(f"conv3d wants a zero-padded Conv3d with numeric padding, got {layer}")
    padding = layer.padding if padding is None else padding
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()):
        return torch.mkldnn_convolution(x, layer.weight, layer.bias, padding, layer.stride, layer.dilation,
                                        layer.groups)
    return F.conv3d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)


class CausalConv3d(nn.Conv3d):
    """Conv3d, stride 1, padded (kt - 1) frames in front and symmetric in space.

    `padding` is "zeros" (Wan) or "replicate" (paper; the front pad repeats frame 0). Zero spatial
    padding is left to the convolution itself (no padded copy of the input is made).
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], padding: str = "zeros"):
        super().__init__(cin, cout, kernel, padding=0)
        self.mode = _pad_mode(padding)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        kt, kh, kw = self.kernel_size
        ctx = kt - 1  # frames of context before the first output frame
        prev = None if cache is None else cache.tails.get(self)
        if prev is None:
            x = F.pad(x, (0, 0, 0, 0, ctx, 0), mode=self.mode) if ctx else x
        else:
            x = torch.cat([prev, x], dim=2)
        if cache is not None and ctx:
            cache.tails[self] = x[:, :, -ctx:]
        if self.mode == "constant":
            return conv3d(self, x, padding=(0, kh // 2, kw // 2))
        x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, 0, 0), mode=self.mode) if kh > 1 or kw > 1 else x
        return conv3d(self, x)


def resize_cond(c: torch.Tensor, size: tuple[int, int, int], time_stride: int) -> torch.Tensor:
    """Nearest-resize latent-grid features (B, C, t, h, w) onto a feature grid (T, H, W), causally.

    Time follows the VAE's layout: latent frame 0 covers feature frame 0 alone and each later
    latent frame covers `time_stride` frames (T = 1 + (t - 1) * s); a streamed chunk without
    frame 0 has T = t * s.
    """
    t, h, w = c.shape[2:]
    T, H, W = size
    s = time_stride
    if T == t * s:
        c = c.repeat_interleave(s, dim=2)
    elif T == 1 + (t - 1) * s:
        c = torch.cat([c[:, :, :1], c[:, :, 1:].repeat_interleave(s, dim=2)], dim=2)
    else:
        raise ValueError(f"cannot map {t} latent frames onto {T} feature frames at time stride {s}")
    if H % h or W % w:
        raise ValueError(f"cannot map a {h}x{w} latent grid onto {H}x{W} features")
    return c.repeat_interleave(H // h, dim=3).repeat_interleave(W // w, dim=4)


class Norm(nn.Module):
    """Per-frame norm over channels: "rms" (Wan: unit RMS * weight) or "group" (GroupNorm).

    With `cond_channels`, an adaptive norm (MAGVIT-v2 decoder): the latent z, nearest-resized to
    the feature grid by the caller (`resize_cond`) and mapped by a 1x1x1 conv, gives scale and shift:
    y = norm(x) * (1 + scale) + shift. The conv is zero-initialized, so a fresh one is a plain norm.
    """

    def __init__(self, kind: str, channels: int, groups: int = 32, eps: float = 1e-6,
                 cond_channels: int | None = None):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(channels))
        if kind == "group":
            self.groups = math.gcd(groups, channels)  # largest group count <= `groups` dividing C
            self.bias = nn.Parameter(torch.zeros(channels))
        self.mod = None
        if cond_channels is not None:
            self.mod = nn.Conv3d(cond_channels, 2 * channels, 1)
            nn.init.zeros_(self.mod.weight)
            nn.init.zeros_(self.mod.bias)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.kind == "rms":
            # x / ||x|| * sqrt(C) is x / rms(x): Wan's F.normalize(x) * sqrt(C) (eps 1e-12 on the norm), with
            # the norm as a sum of squares (2x faster than linalg.vector_norm over dim 1 on the CPU) and
            # sqrt(C) folded into the per-channel gain (one full-size multiply fewer).
            norm = x.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)  # (B, 1, ...)
            return x / norm * (self.weight.float() * math.sqrt(x.shape[1])).view(shape)
        if x.ndim == 5:  # GroupNorm per frame: (B, C, T, H, W) -> (B*T, C, H, W)
            B, C, T, H, W = x.shape
            y = self._group(x.transpose(1, 2).reshape(B * T, C, H, W))
            return y.reshape(B, T, C, H, W).transpose(1, 2)
        return self._group(x)

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight.float(), self.bias.float(), self.eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self._normalize(x.float()).to(x.dtype)  # statistics in fp32 under bf16/fp16
        if self.mod is None:
            return y
        if cond is None:
            raise ValueError("this adaptive norm needs the latent as cond")
        scale, shift = self.mod(cond).chunk(2, dim=1)
        return y * (1 + scale) + shift


class ResBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a (1x1x1 projected) shortcut."""

    def __init__(self, cin: int, cout: int, norm: dict, padding: str):
        super().__init__()
        self.norm1 = Norm(channels=cin, **norm)
        self.conv1 = CausalConv3d(cin, cout, 3, padding)
        self.norm2 = Norm(channels=cout, **norm)
        self.conv2 = CausalConv3d(cout, cout, 3, padding)
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)), cache)
        h = self.conv2(F.silu(self.norm2(h, cond)), cache)
        return h + (x if self.shortcut is None else self.shortcut(x))


class Attention(nn.Module):
    """Single-head spatial self-attention within each frame (Wan's mid-block attention)."""

    def __init__(self, channels: int, norm: dict):
        super().__init__()
        self.norm = Norm(channels=channels, **norm)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C, H, W)
        q, k, v = self.to_qkv(h).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # (B*T, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return x + h.reshape(B, T, C, H, W).transpose(1, 2)


class Down(nn.Module):
    """Stride-2 downsampling in space and/or time.

    space: pad right/bottom by one, Conv2d k3 s2 per frame. time: frame 0 passes alone, then a
    Conv3d (3, 1, 1) with stride 2 and no padding over frames (0,1,2), (2,3,4), ...; so
    1 + 2k frames become 1 + k and output frame j reads input frames <= 2j (Wan 2.1's scheme).
    """

    def __init__(self, channels: int, space: bool, time: bool, padding: str):
        super().__init__()
        self.mode = _pad_mode(padding)
        self.spatial = nn.Conv2d(channels, channels, 3, stride=2) if space else None
        self.temporal = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if time else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.spatial is not None:
            B, C, T, H, W = x.shape
            h = F.pad(x.transpose(1, 2).reshape(B * T, C, H, W), (0, 1, 0, 1), mode=self.mode)
            x = self.spatial(h).reshape(B, T, C, H // 2, W // 2).transpose(1, 2)
        if self.temporal is None:
            return x
        prev = None if cache is None else cache.tails.get(self)
        head = x[:, :, :1] if prev is None else x[:, :, :0]
        seq = x if prev is None else torch.cat([prev, x], dim=2)
        if cache is not None:
            cache.tails[self] = x[:, :, -1:]
        out = conv3d(self.temporal, seq) if seq.shape[2] >= 3 else seq[:, :, :0]
        return torch.cat([head, out], dim=2)


class Up(nn.Module):
    """Stride-2 upsampling in time and/or space; channels halve when space is upsampled.

    time: frame 0 passes alone; later frames go through a causal Conv3d (3, 1, 1) to 2C channels,
    read as two frames each (Wan 2.1's scheme: 1 + k frames become 1 + 2k). space: nearest x2,
    then Conv2d k3 from C to C // 2 channels per frame (C with keep_width).
    """

    def __init__(self, channels: int, space: bool, time: bool, padding: str, keep_width: bool = False):
        super().__init__()
        self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1), padding) if time else None
        self.spatial = None
        if space:  # Wan 2.1 halves the width here; Wan 2.2 (keep_width) does not
            out = channels if keep_width else channels // 2
            self.spatial = nn.Conv2d(channels, out, 3, padding=1, padding_mode=padding)

    @property
    def out_channels(self) -> int:
        return self.spatial.out_channels if self.spatial is not None else self.temporal.in_channels

    def _time(self, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        seen = cache is not None and self in cache.tails  # frame 0 went by in an earlier chunk
        head, rest = (x[:, :, :0], x) if seen else (x[:, :, :1], x[:, :, 1:])
        if cache is not None and not seen:
            cache.tails[self] = head
        if rest.shape[2] == 0:
            return head
        B, C, T, H, W = rest.shape
        y = self.temporal(rest, cache).reshape(B, 2, C, T, H, W)
        y = y.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frame 2t = first half, 2t+1 = second
        return torch.cat([head, y], dim=2)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.temporal is not None:
            x = self._time(x, cache)
        if self.spatial is not None:
            B, C, T, H, W = x.shape
            h = x.transpose(1, 2).reshape(B * T, C, H, W)
            h = F.interpolate(h, scale_factor=2.0, mode="nearest-exact")
            x = self.spatial(h).reshape(B, T, -1, 2 * H, 2 * W).transpose(1, 2)
        return x


def avg_down(x: torch.Tensor, channels: int, time: int, space: int) -> torch.Tensor:
    """Wan 2.2's encoder shortcut: space-to-depth by (time, space, space), then the mean of each run of
    consecutive channels, down to `channels`: (B, C, T, H, W) -> (B, channels, T / time, H / s, W / s).

    Zero frames pad the front up to a multiple of `time`: 1 + 2k frames pair frame 0 with a zero frame,
    and so does a streamed chunk holding frame 0 alone, while later chunks (whole groups) need none; so
    whole and streamed agree, and output frame j reads input frames <= time * j."""
    B, C, T, H, W = x.shape
    pad = -T % time
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    t = (T + pad) // time
    x = x.reshape(B, C, t, time, H // space, space, W // space, space)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, channels, -1, t, H // space, W // space)
    return x.mean(2)


def dup_up(x: torch.Tensor, channels: int, time: int, space: int, frames: int) -> torch.Tensor:
    """Wan 2.2's decoder shortcut: each channel repeated, then depth-to-space by (time, space, space), down to
    `channels`; the last `frames` frames are kept (an upsampler turns frame 0 into one frame, not `time`).
    (B, C, T, H, W) -> (B, channels, frames, H * space, W * space)."""
    B, C, T, H, W = x.shape
    x = x.repeat_interleave(channels * time * space * space // C, dim=1)
    x = x.reshape(B, channels, time, space, space, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(B, channels, T * time, H * space, W * space)
    return x[:, :, x.shape[2] - frames:]
