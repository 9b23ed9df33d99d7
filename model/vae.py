"""Causal 3D VAE (MAGVIT-v2 style; also expresses Wan 2.1's and Wan 2.2's VAEs through VAEConfig fields).

Level i of the encoder runs `encoder_blocks[i]` residual blocks at width base * channel_mult[i],
then downsamples by (time_strides[i], space_strides[i]); a mid block (res, [attention], res) and
a norm-SiLU-conv head give the posterior parameters, projected by a 1x1x1 `quant_conv`. The
decoder mirrors it: `post_quant_conv`, conv_in, mid block, then from the deepest level up: upsample
(halving the width, Wan's layout) and `decoder_blocks[i]` residual blocks; with
`decoder_adaptive_norm` every decoder norm but the attention's is modulated by the latent.
With `residual` (Wan 2.2) parameter-free shortcuts span each resampling stage (vae_blocks.avg_down /
dup_up), the upsamplers keep their width, and the decoder may have its own `decoder_base_channels`.

With `patch` (time, space) > 1 the video is pixel-unshuffled first (a lossless patchify stem) and
the decoder's output shuffled back. `arch="linear"` replaces encoder and decoder by one 1x1x1 linear
map each on the patchified video: a linear autoencoder (the toy world's, fitted as a PCA by
`setseq pretrain`), causal by construction since latent frame j reads only its own frame group.

Causality: latent frame j reads input frames <= j * time_compression, and output frames of
latent frame j never read later latent frames. Frame 0 is encoded alone, so an image is a
1-frame video; videos have 1 + k * time_compression frames. `chunk=` streams a video through
an explicit `StreamCache` (Wan encodes 1 frame, then chunks of 4); streamed equals whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VAEConfig
from model.vae_blocks import (
    Attention,
    CausalConv3d,
    Down,
    Norm,
    ResBlock,
    StreamCache,
    Up,
    avg_down,
    dup_up,
    resize_cond,
)

# Above this many pixel-frames (T * H * W) `stream_chunks` streams: a whole-clip pass holds every frame's
# activations at once (Wan 2.1's 81 x 480 x 832 would need tens of GB). On the CPU (benchmarks/bench_vae.py)
# whole was faster at 9 x 64 x 64 (encode 0.29 vs 0.34 of diffusers' time) and streaming at 17 x 128 x 128
# (decode 0.65 vs 0.92, encode 0.64 vs 0.77). Streamed equals whole (tests/test_vae.py).
STREAM_ABOVE = 9 * 64 * 64


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element (fp32)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


class MidBlock(nn.Module):
    def __init__(self, channels: int, norm: dict, padding: str, attention: bool):
        super().__init__()
        self.block1 = ResBlock(channels, channels, norm, padding)
        plain = {k: v for k, v in norm.items() if k != "cond_channels"}  # attention's norm is never adaptive
        self.attn = Attention(channels, plain) if attention else None
        self.block2 = ResBlock(channels, channels, norm, padding)

    def forward(self, x: torch.Tensor, cache: StreamCache | None, cond: torch.Tensor | None = None):
        x = self.block1(x, cache, cond)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x, cache, cond)


class EncoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, norm: dict, padding: str, ts: int, ss: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, cout, norm, padding) for c in [cin] + [cout] * (blocks - 1))
        self.down = Down(cout, ss == 2, ts == 2, padding) if (ts, ss) != (1, 1) else None


class DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, norm: dict, padding: str, ts: int, ss: int,
                 keep_width: bool = False):
        super().__init__()
        self.up = Up(cin, ss == 2, ts == 2, padding, keep_width) if (ts, ss) != (1, 1) else None
        cin = self.up.out_channels if self.up is not None else cin
        self.blocks = nn.ModuleList(ResBlock(c, cout, norm, padding) for c in [cin] + [cout] * (blocks - 1))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        norm, pad, ch = {"kind": cfg.norm, "groups": cfg.norm_groups}, cfg.padding, cfg.encoder_widths
        self.conv_in = CausalConv3d(cfg.patched_channels, cfg.base_channels, 3, pad)
        cins = [cfg.base_channels] + ch[:-1]
        ts, ss = cfg.time_strides, cfg.space_strides
        nb = cfg.encoder_blocks
        self.levels = nn.ModuleList(EncoderLevel(cins[i], ch[i], nb[i], norm, pad, ts[i], ss[i])
                                    for i in range(len(ch)))
        self.residual, self.strides = cfg.residual, list(zip(ts, ss, strict=True))
        self.mid = MidBlock(ch[-1], norm, pad, cfg.mid_attention)
        self.norm_out = Norm(channels=ch[-1], **norm)
        self.conv_out = CausalConv3d(ch[-1], cfg.latent_channels * (2 if cfg.kl else 1), 3, pad)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)  # (B, C0, T, H, W)
        for level, (ts, ss) in zip(self.levels, self.strides, strict=True):
            skip = x
            for block in level.blocks:
                x = block(x, cache)
            if level.down is not None:
                x = level.down(x, cache)
            if self.residual:  # Wan 2.2: the level's input, averaged down to the level's output grid
                x = x + avg_down(skip, x.shape[1], ts, ss)
        x = self.mid(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, Z or 2Z, T', H', W')


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n, pad = cfg.decoder_widths, len(cfg.channel_mult), cfg.padding
        norm = {"kind": cfg.norm, "groups": cfg.norm_groups,
                "cond_channels": cfg.latent_channels if cfg.decoder_adaptive_norm else None}
        self.adaptive = cfg.decoder_adaptive_norm
        # Time stride of level i's grid relative to the latent grid (for resizing the adaptive-norm cond).
        self.time_scale = [math.prod(cfg.time_strides[i:]) for i in range(n)]
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[-1], 3, pad)
        self.mid = MidBlock(ch[-1], norm, pad, cfg.mid_attention)
        below = ch[1:] + ch[-1:]  # width arriving at level i from the level beneath it (or the mid block)
        ts, ss = cfg.time_strides, cfg.space_strides
        nb = cfg.decoder_blocks
        self.levels = nn.ModuleList(
            DecoderLevel(below[i], ch[i], nb[i], norm, pad, ts[i], ss[i], cfg.residual) for i in range(n))
        self.residual, self.strides = cfg.residual, list(zip(ts, ss, strict=True))
        self.norm_out = Norm(channels=ch[0], **norm)
        self.conv_out = CausalConv3d(ch[0], cfg.patched_channels, 3, pad)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.conv_in(z, cache)  # (B, C, T', H', W')
        x = self.mid(x, cache, z if self.adaptive else None)
        cond = skip = None
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if level.up is not None:
                x = level.up(x, cache)
                if skip is not None:  # Wan 2.2: the previous level's input, duplicated up to this grid
                    x = x + dup_up(skip, x.shape[1], *self.strides[i], frames=x.shape[2])
            skip = x if self.residual else None
            if self.adaptive:
                cond = resize_cond(z, tuple(x.shape[2:]), self.time_scale[i])
            for block in level.blocks:
                x = block(x, cache, cond)
        return self.conv_out(F.silu(self.norm_out(x, cond)), cache)  # (B, 3, T, H, W)


class LinearEncoder(nn.Module):
    """arch="linear": one 1x1x1 map from the patchified video to the latent (posterior parameters)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.patched_channels, cfg.latent_channels * (2 if cfg.kl else 1), 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.proj(x)


class LinearDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.latent_channels, cfg.patched_channels, 1)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.proj(z)


@torch.no_grad()
def init_linear_skip(vae: VAE, linear: VAE) -> None:
    """Start a `linear_skip` conv VAE as the linear VAE `linear` (the PCA, on patches of the conv VAE's
    compression, at its latent size): the skip maps take `linear`'s maps, its quant convs folded in (exact
    for the PCA's identities); our quant convs become identities and the last conv of encoder and decoder
    zero. Encode and decode then equal `linear`'s (to fp32 rounding) until training moves the convs, which
    learn the residual."""
    if not vae.cfg.linear_skip or linear.cfg.arch != "linear":
        raise ValueError(f"init_linear_skip wants a linear_skip conv VAE and a linear VAE, got linear_skip "
                         f"{vae.cfg.linear_skip} and arch {linear.cfg.arch!r}")
    for name, ours, theirs in (("patch", vae.skip_patch, linear.cfg.patch),
                               ("patch_order", vae.cfg.patch_order, linear.cfg.patch_order),
                               ("latent_channels", vae.cfg.latent_channels, linear.cfg.latent_channels)):
        if ours != theirs:
            raise ValueError(f"init_linear_skip: the skip path's {name} {ours} != the linear VAE's {theirs}; "
                             f"fit the linear VAE with {name} {ours}")
    z, d = vae.cfg.latent_channels, vae.skip_encoder.in_channels
    q, enc = linear.quant_conv.weight[:z, :, 0, 0, 0], linear.encoder.proj  # q: the posterior mean's rows
    vae.skip_encoder.weight.copy_((q @ enc.weight.view(-1, d)).view(z, d, 1, 1, 1))
    vae.skip_encoder.bias.copy_(q @ enc.bias + linear.quant_conv.bias[:z])
    pq, dec = linear.post_quant_conv, linear.decoder.proj
    vae.skip_decoder.weight.copy_((dec.weight.view(d, z) @ pq.weight.view(z, z)).view(d, z, 1, 1, 1))
    vae.skip_decoder.bias.copy_(dec.weight.view(d, z) @ pq.bias + dec.bias)
    for conv in (vae.quant_conv, vae.post_quant_conv):
        n = conv.weight.shape[0]
        conv.weight.copy_(torch.eye(n).view(n, n, 1, 1, 1))
        conv.bias.zero_()
    for conv in (vae.encoder.conv_out, vae.decoder.conv_out):
        conv.weight.zero_()
        conv.bias.zero_()


def patchify(x: torch.Tensor, patch: tuple[int, int], first: bool, order: str = "hw") -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C * pt * ps * ps, T', H / ps, W / ps), channels ordered (C, pt, h, w), or
    (C, pt, w, h) with order "wh" (Wan 2.2's).

    first: x starts with frame 0, which is repeated pt - 1 times in front so it fills a time group
    alone (T = 1 + k * pt -> 1 + k groups); otherwise T is a multiple of pt."""
    pt, ps = patch
    if (pt, ps) == (1, 1):
        return x
    if first and pt > 1:
        x = torch.cat([x[:, :, :1].expand(-1, -1, pt - 1, -1, -1), x], dim=2)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // pt, pt, H // ps, ps, W // ps, ps)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6) if order == "hw" else x.permute(0, 1, 3, 7, 5, 2, 4, 6)
    return x.reshape(B, C * pt * ps * ps, T // pt, H // ps, W // ps)


def unpatchify(x: torch.Tensor, patch: tuple[int, int], first: bool, order: str = "hw") -> torch.Tensor:
    """Inverse of `patchify`; with `first`, frame 0 is the mean of its group's pt frames."""
    pt, ps = patch
    if (pt, ps) == (1, 1):
        return x
    B, CP, t, h, w = x.shape
    C = CP // (pt * ps * ps)
    x = x.reshape(B, C, pt, ps, ps, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4) if order == "hw" else x.permute(0, 1, 5, 2, 6, 4, 7, 3)
    x = x.reshape(B, C, t * pt, h * ps, w * ps)
    if first and pt > 1:
        x = torch.cat([x[:, :, :pt].mean(2, keepdim=True), x[:, :, pt:]], dim=2)
    return x


def _nearest(value: int, step: int, first: int) -> str:
    """The valid counts first + k * step just below and above `value`, as 'a or b'."""
    lo = first + max(0, (value - first) // step) * step
    options = [lo, lo + step] if lo < value else [lo]
    options = [o for o in options if o >= first and o != value] or [first]
    return " or ".join(str(o) for o in options)


class VAE(nn.Module):
    """encode(video) -> normalized latent; decode(latent) -> video in [-1, 1]. Shapes (B, C, T, H, W)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        z, linear = cfg.latent_channels, cfg.arch == "linear"
        self.encoder = LinearEncoder(cfg) if linear else Encoder(cfg)
        self.quant_conv = nn.Conv3d(z * (2 if cfg.kl else 1), z * (2 if cfg.kl else 1), 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        self.decoder = LinearDecoder(cfg) if linear else Decoder(cfg)
        # linear_skip: a linear VAE on (time, space) compression patches beside the convs, whose outputs add
        # to its posterior mean and its decoded video (init_linear_skip sets it to the PCA).
        self.skip_encoder = self.skip_decoder = None
        if cfg.linear_skip:
            self.skip_patch = (cfg.time_compression, cfg.space_compression)
            d = cfg.in_channels * cfg.time_compression * cfg.space_compression ** 2
            self.skip_encoder, self.skip_decoder = nn.Conv3d(d, z, 1), nn.Conv3d(z, d, 1)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)build the latent normalization statistics from the config, on the current default device.
        They are config data, not weights: non-persistent buffers, kept out of the state dict, so a
        meta-device load (weights/load.py) calls this instead of rebuilding the whole VAE."""
        cfg, z = self.cfg, self.cfg.latent_channels
        mean = torch.tensor(cfg.latents_mean) if cfg.latents_mean is not None else torch.zeros(z)
        std = torch.tensor(cfg.latents_std) if cfg.latents_std is not None else torch.ones(z)
        self.register_buffer("latents_mean", mean.view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, z, 1, 1, 1), persistent=False)

    # ---- shapes and input checks -------------------------------------------------------------
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (frames, height, width) video."""
        self._check_size(frames, height, width)
        tc, sc = self.cfg.time_compression, self.cfg.space_compression
        return (self.cfg.latent_channels, 1 + (frames - 1) // tc, height // sc, width // sc)

    def _check_size(self, frames: int, height: int, width: int) -> None:
        tc, sc = self.cfg.time_compression, self.cfg.space_compression
        if frames < 1 or (frames - 1) % tc:
            valid = _nearest(frames, tc, 1)
            raise ValueError(f"got {frames} frames; this VAE takes 1 + {tc}k frames: {valid}")
        for name, size in (("height", height), ("width", width)):
            if size < sc or size % sc:
                raise ValueError(f"{name} {size} is not a multiple of {sc} (the VAE's spatial compression); "
                                 f"nearest valid: {_nearest(size, sc, sc)}")

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.cfg.in_channels
        if video.ndim != 5 or video.shape[1] != c:
            raise ValueError(f"VAE expects video (B, {c}, T, H, W); got shape {tuple(video.shape)}")
        self._check_size(*video.shape[2:])

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.cfg.latent_channels
        if z.ndim != 5 or z.shape[1] != c:
            raise ValueError(f"VAE expects latents (B, {c}, T', H', W'); got shape {tuple(z.shape)}")

    def _pieces(self, x: torch.Tensor, chunk: int | None, step: int) -> list[torch.Tensor] | None:
        """Frame 0 alone, then chunks of `chunk` frames (a multiple of `step`); None = whole."""
        if chunk is None:
            return None
        if chunk < step or chunk % step:
            raise ValueError(f"chunk {chunk} must be a positive multiple of {step}")
        return [x[:, :, :1], *(x[:, :, 1:].split(chunk, dim=2) if x.shape[2] > 1 else ())]

    def stream_chunks(self, frames: int, height: int, width: int) -> tuple[int | None, int | None]:
        """(encode chunk, decode chunk) for a video of this size: None (whole clip) up to STREAM_ABOVE
        pixel-frames, else streamed as Wan does (time_compression frames / one latent frame at a time).
        The linear VAE (the toy world's) has no activations to hold and always runs whole."""
        if self.cfg.arch == "linear" or frames * height * width <= STREAM_ABOVE:
            return None, None
        return self.cfg.time_compression, 1

    # ---- encode / decode --------------------------------------------------------------------
    def encode_dist(self, video: torch.Tensor, *, chunk: int | str | None = None):
        """Raw posterior (mean, logvar), each (B, Z, T', H', W'); logvar is None when cfg.kl is False.

        chunk: stream the video as frame 0 then `chunk` frames at a time (a multiple of
        time_compression), through a StreamCache; the result equals the whole-video encode.
        "auto": whatever `stream_chunks` picks for this size.
        """
        self._check_video(video)
        if chunk == "auto":
            chunk = self.stream_chunks(*video.shape[2:])[0]
        pieces = self._pieces(video, chunk, self.cfg.time_compression)
        if pieces is None:
            h = self._encode_piece(video, True, None)
        else:
            cache = StreamCache()
            h = torch.cat([self._encode_piece(p, i == 0, cache) for i, p in enumerate(pieces)], dim=2)
        h = self.quant_conv(h)
        if not self.cfg.kl:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _encode_piece(self, x: torch.Tensor, first: bool, cache: StreamCache | None) -> torch.Tensor:
        h = self.encoder(patchify(x, self.cfg.patch, first=first, order=self.cfg.patch_order), cache)
        if self.skip_encoder is None:
            return h
        z = self.cfg.latent_channels  # the skip adds to the posterior mean only
        s = self.skip_encoder(patchify(x, self.skip_patch, first=first, order=self.cfg.patch_order))
        return torch.cat([h[:, :z] + s, h[:, z:]], dim=1)

    def _decode_piece(self, z: torch.Tensor, first: bool, cache: StreamCache | None) -> torch.Tensor:
        x = unpatchify(self.decoder(z, cache), self.cfg.patch, first=first, order=self.cfg.patch_order)
        if self.skip_decoder is None:
            return x
        return x + unpatchify(self.skip_decoder(z), self.skip_patch, first=first, order=self.cfg.patch_order)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)

    def encode(self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               chunk: int | str | None = None) -> torch.Tensor:
        """Normalized latent (z - latents_mean) / latents_std: the posterior mean, or a sample of it."""
        mean, logvar = self.encode_dist(video, chunk=chunk)
        z = mean
        if sample:
            if logvar is None:
                raise ValueError("sample=True needs a KL VAE (cfg.kl); this one has a deterministic latent")
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * eps
        return self.normalize(z)

    def decode_raw(self, z: torch.Tensor, *, chunk: int | str | None = None) -> torch.Tensor:
        """Unclamped decode of a raw (un-normalized) latent; the training path. chunk: as encode_dist's,
        in latent frames."""
        self._check_latent(z)
        if chunk == "auto":
            tc, sc = self.cfg.time_compression, self.cfg.space_compression
            chunk = self.stream_chunks(1 + (z.shape[2] - 1) * tc, z.shape[3] * sc, z.shape[4] * sc)[1]
        z = self.post_quant_conv(z)
        pieces = self._pieces(z, chunk, 1)
        if pieces is None:
            return self._decode_piece(z, True, None)
        cache = StreamCache()
        return torch.cat([self._decode_piece(p, i == 0, cache) for i, p in enumerate(pieces)], dim=2)

    def decode(self, z: torch.Tensor, *, chunk: int | str | None = None, clamp: bool = True) -> torch.Tensor:
        """Video (B, C, 1 + (T'-1) * time_compression, H, W) from a normalized latent, clamped to [-1, 1]."""
        self._check_latent(z)
        x = self.decode_raw(self.denormalize(z), chunk=chunk)
        return x.clamp(-1.0, 1.0) if clamp else x

    def forward(self, video: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        """Training pass: (reconstruction (unclamped), mean, logvar), latents un-normalized."""
        mean, logvar = self.encode_dist(video)
        z = mean
        if sample and logvar is not None:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        return self.decode_raw(z), mean, logvar
