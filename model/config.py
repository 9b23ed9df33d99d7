"""Typed configs for every model family, and the named presets built from them.

One dataclass per family (DiT, VAE, T5); a `ModelConfig` bundles the three with the sampling
defaults of a base model. Presets differ by fields only: no preset forks the code.
Invariants are checked at construction and raise ValueError naming the numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from model.wan_latents import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patchify, ViT-like
    dim: int = 128
    heads: int = 4
    layers: int = 2
    ffn_dim: int = 512  # MLP hidden width (4x dim in the paper)
    text_dim: int = 64  # width of the text encoder's output tokens ("context channels")
    # Wan passes text through Linear-GELU-Linear into `dim` before cross-attention; the paper's
    # DiT is described without one. With it off, cross-attention k/v read text_dim directly.
    text_proj: bool = True
    freq_dim: int = 256  # sinusoidal timestep embedding width
    time_scale: float = 1000.0  # flow time t in [0, 1] is embedded as t * time_scale (Wan: 0..1000)
    # "shared": Wan's one time projection to 6*dim plus a learned per-block table;
    # "per_block": DiT's adaLN, each block owns Linear(dim, 6*dim).
    modulation: str = "shared"
    # "rms_across_heads" (Wan: RMSNorm over all heads' channels), "rms_per_head", "layer_per_head", "none".
    qk_norm: str = "rms_across_heads"
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention (Wan: True)
    eps: float = 1e-6
    # Head channels given to (t, h, w) rotary axes; each must be even and they must sum to
    # head_dim. None means Wan's split: d - 4*(d//6), 2*(d//6), 2*(d//6).
    rope_split: tuple[int, int, int] | None = None
    rope_theta: float = 10000.0
    window: int | None = None  # self-attention window in tokens, centred on the query; None = full
    self_cond: bool = False  # extra zero-initialized input projection of the previous x0 estimate
    # Learned absolute position embedding after patchify, for the toy world only (off for Wan/paper).
    abs_pos: tuple[int, int, int] | None = None  # max token grid (t, h, w) it covers
    # What the head predicts: "velocity" (Wan, the paper) or "x0" (the toy world: a velocity target on
    # its near-deterministic latents gave pure noise). forward() returns a velocity either way,
    # v = (x_t - x0_hat) / t, so samplers and adapters see one interface; the loss uses this space.
    prediction: str = "velocity"
    # Hidden width of a GELU MLP added beside the head's Linear (None: Linear only, as in Wan and every
    # preset). A Linear head's outputs span at most `dim` of a token's out_channels * prod(patch) values:
    # the tiny preset's 128 of 640, which leaves a moving latent frame's detail out of reach of any x0
    # estimate (`setseq pretrain --head-hidden`; benchmarks/results/toyworld-base-experiments.md).
    head_hidden: int | None = None

    def __post_init__(self) -> None:
        _check(self.dim % self.heads == 0, f"DiT dim {self.dim} is not divisible by heads {self.heads}")
        hd = self.head_dim
        _check(hd % 2 == 0, f"DiT head_dim {hd} must be even for RoPE")
        t, h, w = self.rope_axes
        _check(
            t + h + w == hd and t % 2 == 0 and h % 2 == 0 and w % 2 == 0,
            f"RoPE split {(t, h, w)} must be three even numbers summing to head_dim {hd}",
        )
        _check(self.modulation in ("shared", "per_block"), f"unknown modulation {self.modulation!r}")
        kinds = ("rms_across_heads", "rms_per_head", "layer_per_head", "none")
        _check(self.qk_norm in kinds, f"unknown qk_norm {self.qk_norm!r}; choose one of {kinds}")
        _check(self.window is None or self.window > 0, f"window must be positive or None, got {self.window}")
        _check(all(p >= 1 for p in self.patch), f"patch sizes must be >= 1, got {self.patch}")
        _check(self.head_hidden is None or self.head_hidden > 0,
               f"head_hidden must be positive or None, got {self.head_hidden}")
        _check(self.prediction in ("velocity", "x0"),
               f"unknown DiT prediction {self.prediction!r}; choose 'velocity' or 'x0'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        if self.rope_split is not None:
            return tuple(self.rope_split)
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    # "conv": the residual conv encoder/decoder below (MAGVIT-v2 / Wan). "linear": one 1x1x1 linear map
    # each way on the patchified video (a learned linear autoencoder; `setseq pretrain` fits it as the
    # PCA of toy clips): it has no levels, so its strides must be 1s and `patch` is its compression.
    arch: str = "conv"
    # (time, space) pixel-unshuffle before the encoder and shuffle after the decoder (Wan 2.2 / LTX-Video
    # patchify). Causal: frame 0 is repeated to fill its time group; decode keeps that group's mean.
    patch: tuple[int, int] = (1, 1)
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    encoder_blocks: tuple[int, ...] = (1, 1, 1)  # residual blocks per level
    decoder_blocks: tuple[int, ...] = (1, 1, 1)
    # Downsampling applied when leaving each level (product = compression). Level i's strides
    # act between level i and i+1 in the encoder and are mirrored in the decoder.
    time_strides: tuple[int, ...] = (1, 2, 1)
    space_strides: tuple[int, ...] = (2, 2, 1)
    padding: str = "replicate"  # causal pad mode of the 3D convs: "replicate" (paper) or "zeros" (Wan)
    norm: str = "group"  # per-frame norm: "group" (MAGVIT; GroupNorm over C/G, H, W) or "rms" (Wan)
    norm_groups: int = 32  # GroupNorm groups, capped to gcd(norm_groups, channels) at each width
    decoder_adaptive_norm: bool = False  # decoder norms modulated by the latent (paper: True)
    mid_attention: bool = False  # a spatial self-attention block in the middle (Wan: True)
    kl: bool = True  # encoder predicts mean and log-variance; False = deterministic latent
    # Per-channel latent normalization z' = (z - mean) / std (Wan ships these); None = identity.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Wan 2.2 (diffusers' `is_residual`): parameter-free shortcuts around every resampling stage. Encoder:
    # around each level's blocks and downsampler, the input averaged over groups of its space-to-depth
    # channels; decoder: around a level's blocks and the upsampler after them, the input's channels repeated
    # and moved depth-to-space. The decoder's spatial upsamplers then keep their width (Wan 2.1 halves it).
    residual: bool = False
    decoder_base_channels: int | None = None  # decoder width base (Wan 2.2: 256, encoder 160); None = same
    # Channel order of the space-to-depth stem: "hw" (C, pt, h, w), or Wan 2.2's "wh" (C, pt, w, h).
    patch_order: str = "hw"
    # A linear VAE beside the convs: 1x1x1 maps on patches of the whole compression (time_compression x
    # space_compression^2 pixels) to the posterior mean and back to the video, added to the convs' outputs.
    # `setseq pretrain` sets it to the PCA of toy clips and zeroes the convs' last layers
    # (vae.init_linear_skip): training starts at the PCA and the convs learn the residual.
    linear_skip: bool = False

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        for name in ("encoder_blocks", "decoder_blocks", "time_strides", "space_strides"):
            _check(len(getattr(self, name)) == n, f"VAE {name} has {len(getattr(self, name))} entries, "
                   f"channel_mult has {n}; give one per level")
        _check(self.padding in ("replicate", "zeros"), f"unknown VAE padding {self.padding!r}")
        # Resampling is Wan 2.1's stride-2 scheme (frame 0 alone, then pairs), so strides are 1 or 2.
        for name in ("time_strides", "space_strides"):
            v = getattr(self, name)
            _check(all(s in (1, 2) for s in v), f"VAE {name} {v} must be 1s and 2s")
        for name in ("encoder_blocks", "decoder_blocks"):
            v = getattr(self, name)
            _check(all(b >= 1 for b in v), f"VAE {name} {v} must all be >= 1")
        _check(self.norm in ("group", "rms"), f"unknown VAE norm {self.norm!r}")
        _check(self.arch in ("conv", "linear"), f"unknown VAE arch {self.arch!r}; choose 'conv' or 'linear'")
        _check(len(self.patch) == 2 and min(self.patch) >= 1,
               f"VAE patch {self.patch} must be (time, space), each >= 1")
        if self.arch == "linear":
            _check(math.prod(self.time_strides) == math.prod(self.space_strides) == 1,
                   f"a linear VAE has no conv levels: set time_strides and space_strides to 1s (got "
                   f"{self.time_strides}, {self.space_strides}); its compression is `patch`")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            _check(v is None or len(v) == self.latent_channels,
                   f"VAE {name} has {0 if v is None else len(v)} values for {self.latent_channels} channels")
        _check(not self.linear_skip or self.arch == "conv",
               f"VAE linear_skip is a linear path beside a conv VAE's convs; arch {self.arch!r} has none")
        _check(self.patch_order in ("hw", "wh"), f"unknown VAE patch_order {self.patch_order!r}; "
               "choose 'hw' or 'wh'")
        if self.residual:
            self._check_residual()

    def _check_residual(self) -> None:
        """Each shortcut regroups channels: in * factor must split evenly into out (and back)."""
        enc, dec = self.encoder_widths, self.decoder_widths
        for i, (ts, ss) in enumerate(zip(self.time_strides, self.space_strides, strict=True)):
            cin, f = ([self.base_channels] + enc)[i], ts * ss * ss
            _check(cin * f % enc[i] == 0, f"VAE residual shortcut of encoder level {i}: {cin} channels x "
                   f"{f} (strides) do not split into {enc[i]}; choose channel_mult so they do")
            below, f = (dec[1:] + dec[-1:])[i], self.time_strides[i - 1] * self.space_strides[i - 1] ** 2
            if i > 0 and f > 1:  # the decoder's shortcut over level i's blocks and level i - 1's upsampler
                _check(dec[i] * f % below == 0, f"VAE residual shortcut of decoder level {i}: {dec[i]} "
                       f"channels x {f} (strides) are no multiple of {below}; choose channel_mult so")

    @property
    def encoder_widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def decoder_widths(self) -> list[int]:
        return [(self.decoder_base_channels or self.base_channels) * m for m in self.channel_mult]

    @property
    def time_compression(self) -> int:
        return self.patch[0] * math.prod(self.time_strides)

    @property
    def space_compression(self) -> int:
        return self.patch[1] * math.prod(self.space_strides)

    @property
    def patched_channels(self) -> int:
        """Channels the encoder sees (and the decoder gives back) after the patchify stem."""
        return self.in_channels * self.patch[0] * self.patch[1] ** 2


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 512
    dim: int = 64  # d_model
    head_dim: int = 16  # d_kv
    heads: int = 4
    ffn_dim: int = 128  # d_ff
    layers: int = 2
    ffn: str = "gated-gelu"  # "gated-gelu" (T5 v1.1 / umT5) or "relu" (original T5)
    rel_buckets: int = 32
    rel_max_distance: int = 128
    # umT5: every layer owns its relative bias table; T5: one table (layer 0's) shared by every layer.
    per_layer_position_bias: bool = False
    # A learned absolute position embedding added to the token embeddings, which neither T5 nor umT5 has.
    # The tiny base gains it in `setseq pretrain`'s layout stage, which taught it word order: which object
    # of a two-object caption goes left.
    abs_pos: bool = False
    eps: float = 1e-6
    max_length: int = 512  # prompts are padded or truncated to this many tokens

    def __post_init__(self) -> None:
        _check(self.ffn in ("gated-gelu", "relu"),
               f"unknown T5 ffn {self.ffn!r}; choose 'gated-gelu' or 'relu'")
        _check(self.layers >= 1 and self.heads >= 1, "T5 needs at least one layer and one head")
        _check(min(self.vocab_size, self.dim, self.head_dim, self.ffn_dim, self.max_length) >= 1,
               "T5 vocab_size, dim, head_dim, ffn_dim and max_length must all be >= 1")
        # Bidirectional buckets: half per direction, half of those exact, so max_exact = rel_buckets // 4.
        _check(self.rel_buckets >= 4 and self.rel_buckets % 2 == 0,
               f"T5 rel_buckets must be even and >= 4, got {self.rel_buckets}")
        _check(self.rel_max_distance > self.rel_buckets // 4,
               f"T5 rel_max_distance {self.rel_max_distance} must exceed "
               f"rel_buckets // 4 = {self.rel_buckets // 4}")


@dataclass(frozen=True)
class ModelConfig:
    """A base model: its three networks plus how it samples by default."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    sample_shift: float = 1.0  # timestep shift s: t' = s t / (1 + (s - 1) t)
    guidance: float = 5.0
    sample_steps: int = 50
    # Wan 2.2 A14B: a second DiT of the same config, the low-noise expert, denoises t < boundary; the first
    # (high-noise) expert t >= boundary (model/experts.py compares as Wan does). None = one DiT. T2V 0.875,
    # I2V 0.9 (Wan-Video/Wan2.2 wan/configs/wan_{t2v,i2v}_A14B.py).
    boundary: float | None = None
    low_noise_guidance: float | None = None  # guidance on the low-noise stage; None = `guidance`

    def __post_init__(self) -> None:
        _check(self.boundary is None or 0.0 < self.boundary < 1.0,
               f"expert boundary {self.boundary} must lie strictly between 0 and 1 (Wan 2.2 T2V: 0.875)")
        _check(self.low_noise_guidance is None or self.boundary is not None,
               f"low_noise_guidance {self.low_noise_guidance} needs a second expert: set boundary too")
        _check(self.dit.in_channels == self.vae.latent_channels,
               f"DiT in_channels {self.dit.in_channels} != VAE latent_channels {self.vae.latent_channels}")
        _check(self.dit.text_dim == self.t5.dim, f"DiT text_dim {self.dit.text_dim} != T5 dim {self.t5.dim}")

    @property
    def experts(self) -> int:
        """How many DiTs the base samples with: 2 for Wan 2.2 A14B (high- and low-noise), else 1."""
        return 1 if self.boundary is None else 2

    # ------------------------------------------------------------------ valid clips (the one rule)

    def frames_ok(self, frames: int) -> bool:
        """The causal VAE takes 1 + k * time_compression frames (the first is encoded alone), and the
        latent length must tile by the DiT's time patch."""
        tc, pt = self.vae.time_compression, self.dit.patch[0]
        return frames >= 1 and (frames - 1) % tc == 0 and (1 + (frames - 1) // tc) % pt == 0

    def check_frames(self, frames: int) -> None:
        if not self.frames_ok(frames):
            tc, pt = self.vae.time_compression, self.dit.patch[0]
            patch = f" whose latent length is a multiple of the DiT's time patch {pt}" if pt > 1 else ""
            raise ValueError(f"--frames {frames}: this base takes 1 + {tc}k frames{patch}, e.g. "
                             f"{_neighbours(frames, self.frames_ok)} (VAE time compression {tc}); {frames} "
                             "frames cannot be encoded")

    def check_size(self, size: tuple[int, int]) -> None:
        """Height and width must be positive multiples of the VAE's space compression x the DiT patch."""
        sc, (_, ph, pw) = self.vae.space_compression, self.dit.patch
        steps = (sc * ph, sc * pw)
        for name, value, m in zip(("height", "width"), size, steps, strict=True):
            if value < m or value % m:
                near = "x".join(str(max(k, s // k * k)) for k, s in zip(steps, size, strict=True))
                near_side = _neighbours(value, lambda n, m=m: n % m == 0)
                raise ValueError(f"--size {size[0]}x{size[1]}: height and width must be positive multiples "
                                 f"of {m} (VAE space compression {sc} x DiT patch {m // sc}), e.g. {near}; "
                                 f"{name} {value} is not a multiple of {m} (use {name} {near_side})")

    def latent_shape(self, frames: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(C, T', H', W') of a clip of `frames` x size (H, W), or a ValueError naming valid values."""
        self.check_frames(frames)
        self.check_size(size)
        sc = self.vae.space_compression
        shape = (self.vae.latent_channels, 1 + (frames - 1) // self.vae.time_compression,
                 size[0] // sc, size[1] // sc)
        grid = self._grid(shape)
        limit = self.dit.abs_pos
        _check(limit is None or all(g <= m for g, m in zip(grid, limit, strict=True)),
               f"--frames {frames} --size {size[0]}x{size[1]} gives a token grid {grid} larger than base "
               f"{self.name} was built for {tuple(limit or ())}; ask for fewer frames or a smaller size")
        return shape

    def token_grid(self, frames: int, size: tuple[int, int]) -> tuple[int, int, int]:
        """(T, H, W) tokens the DiT sees for one clip: the latent grid divided by the patch."""
        return self._grid(self.latent_shape(frames, size))

    def _grid(self, shape: tuple[int, int, int, int]) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(shape[1:], self.dit.patch, strict=True))

    def longest_clip(self, available: int, most: int = 81) -> int:
        """The longest valid clip of at most min(available, most) frames; 0 when none fits."""
        return next((n for n in range(min(available, most), 0, -1) if self.frames_ok(n)), 0)

    @property
    def size_multiple(self) -> int:
        """What a frame side is cropped to a multiple of, so every patch of the latent is whole."""
        return self.vae.space_compression * max(self.dit.patch[1:])

    @property
    def default_clip(self) -> tuple[int, int, int] | None:
        """(frames, H, W) the base was trained to generate; None for a base this table does not know."""
        return DEFAULT_CLIPS.get(self.name)

    @property
    def default_fps(self) -> float:
        """The frame rate the base's clips play at (Wan 2.1: 16, TI2V-5B: 24); 8 for a base not listed."""
        return DEFAULT_FPS.get(self.name, 8.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            _check(not unknown, f"unknown {kind.__name__} fields {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        top = {k: v for k, v in d.items() if k not in ("dit", "vae", "t5")}
        kinds = {"dit": DiTConfig, "vae": VAEConfig, "t5": T5Config}
        return cls(**{k: build(kind, d[k]) for k, kind in kinds.items()}, **top)


_WAN_VAE = VAEConfig(
    in_channels=3, latent_channels=16, base_channels=96, channel_mult=(1, 2, 4, 4),
    encoder_blocks=(2, 2, 2, 2), decoder_blocks=(3, 3, 3, 3),
    time_strides=(1, 2, 2, 1), space_strides=(2, 2, 2, 1),
    padding="zeros", norm="rms", decoder_adaptive_norm=False, mid_attention=True, kl=True,
    latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD,
)

# Wan 2.2 VAE (TI2V-5B): 2x2 space-to-depth stem, residual resampling, 48 channels, 4x16x16.
_WAN22_VAE = dataclasses.replace(
    _WAN_VAE, latent_channels=48, base_channels=160, decoder_base_channels=256, patch=(1, 2),
    patch_order="wh", residual=True, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)

# umT5-XXL, the text encoder of Wan 2.1.
_UMT5_XXL = T5Config(vocab_size=256384, dim=4096, head_dim=64, heads=64, ffn_dim=10240, layers=24,
                     ffn="gated-gelu", per_layer_position_bias=True)


def _wan_dit(dim: int, heads: int, layers: int, ffn_dim: int, channels: int = 16) -> DiTConfig:
    return DiTConfig(in_channels=channels, out_channels=channels, dim=dim, heads=heads, layers=layers,
                     ffn_dim=ffn_dim,
                     text_dim=4096, text_proj=True, modulation="shared", qk_norm="rms_across_heads",
                     cross_attn_norm=True, rope_split=None, window=None, self_cond=False)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the toy world: small enough that a forward pass takes milliseconds.
    "tiny": ModelConfig(
        name="tiny",
        # x0 head and a learned absolute position (covering up to 8x8x8 tokens): what the toy world's
        # near-deterministic latents need (design.md, "The toy world"); `setseq pretrain` measures them.
        dit=DiTConfig(in_channels=160, out_channels=160, dim=128, heads=4, layers=4, ffn_dim=512, text_dim=64,
                      text_proj=True, modulation="shared", qk_norm="rms_per_head", rope_split=(16, 8, 8),
                      self_cond=True, prediction="x0", abs_pos=(8, 8, 8)),
        # A linear VAE on 4-frame x 8x8 patches (768 values -> 160 channels, 4.8x), fitted as a PCA by
        # `setseq pretrain`: 31 dB on held-out clips in 16 s. The conv VAE this preset had before (16 latent
        # channels, 14 min of CPU training) reached 19.9 dB, below this PCA's first 16 channels (24.8 dB).
        vae=VAEConfig(in_channels=3, latent_channels=160, arch="linear", patch=(4, 8), kl=False,
                      channel_mult=(1,), encoder_blocks=(1,), decoder_blocks=(1,), time_strides=(1,),
                      space_strides=(1,)),
        # 64 tokens: a stitched two-concept prompt ("On the left, ... On the right, ...") takes ~46.
        t5=T5Config(vocab_size=512, dim=64, head_dim=16, heads=4, ffn_dim=128, layers=2, max_length=64),
        # Also the pretraining time shift (toyworld/pretrain.py, `time_shift`), so both agree. Guidance 1: on
        # the committed base's held-out captions guidance 3 kept colour and motion (within 0.01) and split
        # objects (one object 0.94 -> 0.55; assets/tiny/report.md); concepts measured better at 1 too.
        sample_shift=5.0, guidance=1.0, sample_steps=25,
    ),
    # The tiny base's DiT on a causal conv VAE in the paper's style (Table 4's features at a small width:
    # causal 3D convs with replicate padding, residual blocks, GroupNorm, adaptive norm in the decoder only,
    # KL posterior, frame 0 encoded alone) behind a 4x8x8 pixel-unshuffle stem, 64 latent channels (the
    # linear `tiny` keeps 160), beside a linear skip path that `setseq pretrain` sets to the 64-channel PCA
    # (27.95 dB held-out): the convs learn its residual. 28.83 dB on held-out whole clips in 1000 steps (28
    # min at a load of 5; ~15 min alone), against 22.3 dB for the convs alone in 700; the goal, 31 dB, is
    # missed (benchmarks/results/toyworld-base-experiments.md, entries 4 and 5).
    "tiny-conv": ModelConfig(
        name="tiny-conv",
        dit=DiTConfig(in_channels=64, out_channels=64, dim=128, heads=4, layers=4, ffn_dim=512, text_dim=64,
                      text_proj=True, modulation="shared", qk_norm="rms_per_head", rope_split=(16, 8, 8),
                      self_cond=True, prediction="x0", abs_pos=(8, 8, 8)),
        vae=VAEConfig(in_channels=3, latent_channels=64, arch="conv", patch=(4, 8), base_channels=64,
                      channel_mult=(1,), encoder_blocks=(1,), decoder_blocks=(1,), time_strides=(1,),
                      space_strides=(1,), padding="replicate", norm="group", decoder_adaptive_norm=True,
                      kl=True, linear_skip=True),
        t5=T5Config(vocab_size=512, dim=64, head_dim=16, heads=4, ffn_dim=128, layers=2, max_length=64),
        sample_shift=5.0, guidance=1.0, sample_steps=25,
    ),
    # The paper's model (Tables 4-5): build on the meta device only. The T5 size is not named in
    # the paper beyond 1024 context channels; T5 v1.1 large has d_model 1024.
    "paper": ModelConfig(
        name="paper",
        # 11.85B parameters on the meta device (paper: 11.5B, +3%). Per-block adaLN as in DiT [39], the
        # paper's cited modulation, is what reaches that size: Wan's shared table would give 8.7B; with
        # text_proj off it would be 11.0B. Table 5 leaves the text projection unnamed; we keep Wan's.
        dit=DiTConfig(in_channels=32, out_channels=32, dim=4096, heads=32, layers=32, ffn_dim=4 * 4096,
                      text_dim=1024, text_proj=True, modulation="per_block", qk_norm="rms_per_head",
                      cross_attn_norm=False, rope_split=(64, 32, 32), window=6144, self_cond=True),
        vae=VAEConfig(in_channels=3, latent_channels=32, base_channels=16, channel_mult=(1, 4, 16, 32, 64),
                      encoder_blocks=(1, 1, 2, 8, 8), decoder_blocks=(4, 4, 4, 4, 4),
                      time_strides=(1, 2, 2, 2, 1), space_strides=(2, 2, 2, 2, 1),
                      padding="replicate", norm="group", decoder_adaptive_norm=True, kl=True),
        t5=T5Config(vocab_size=32128, dim=1024, head_dim=64, heads=16, ffn_dim=2816, layers=24),
        sample_shift=3.0, guidance=8.0, sample_steps=50,
    ),
    "wan2.1-1.3b": ModelConfig(name="wan2.1-1.3b", dit=_wan_dit(1536, 12, 30, 8960), vae=_WAN_VAE,
                               t5=_UMT5_XXL, sample_shift=5.0, guidance=5.0, sample_steps=50),
    "wan2.1-14b": ModelConfig(name="wan2.1-14b", dit=_wan_dit(5120, 40, 40, 13824), vae=_WAN_VAE,
                              t5=_UMT5_XXL, sample_shift=5.0, guidance=5.0, sample_steps=50),
    # Two Wan-2.1-14B-shaped experts on the Wan 2.1 VAE and umT5 (Wan-Video/Wan2.2
    # wan/configs/wan_t2v_A14B.py: boundary 0.875, sample_shift 12, 40 steps, sample_guide_scale (3.0, 4.0) =
    # (low noise, high noise)).
    "wan2.2-t2v-a14b": ModelConfig(name="wan2.2-t2v-a14b", dit=_wan_dit(5120, 40, 40, 13824), vae=_WAN_VAE,
                                   t5=_UMT5_XXL, sample_shift=12.0, guidance=4.0, sample_steps=40,
                                   boundary=0.875, low_noise_guidance=3.0),
    # Wan 2.2 TI2V-5B (wan/configs/wan_ti2v_5B.py): one DiT on the 48-channel Wan 2.2 VAE; text- and
    # image-to-video (the image is a clean first latent frame at timestep 0).
    "wan2.2-ti2v-5b": ModelConfig(name="wan2.2-ti2v-5b", dit=_wan_dit(3072, 24, 30, 14336, channels=48),
                                  vae=_WAN22_VAE, t5=_UMT5_XXL, sample_shift=5.0, guidance=5.0,
                                  sample_steps=50),
}


# Default clip (frames, H, W) per base name. Keyed by name, not stored in the config, so a checkpoint
# folder converted from a preset (config.json records the name) has the same default.
DEFAULT_CLIPS: dict[str, tuple[int, int, int]] = {
    "tiny": (17, 64, 64),  # the toy world
    "tiny-conv": (17, 64, 64),
    "paper": (121, 576, 1024),  # 5 s at 24 fps, 16:9 (paper §8)
    "wan2.1-1.3b": (81, 480, 832),
    "wan2.1-14b": (81, 720, 1280),
    "wan2.2-t2v-a14b": (81, 720, 1280),
    "wan2.2-ti2v-5b": (121, 704, 1280),  # 5 s at 24 fps (Wan 2.2's 1280*704)
}


# Frame rate per base name (Wan's sample_fps: wan/configs/*.py), for the videos written from its clips.
DEFAULT_FPS: dict[str, float] = {"paper": 24.0, "wan2.1-1.3b": 16.0, "wan2.1-14b": 16.0,
                                 "wan2.2-t2v-a14b": 16.0, "wan2.2-ti2v-5b": 24.0}


def _neighbours(value: int, ok, limit: int = 100_000) -> str:
    """'a or b': the nearest valid integers below and above `value` (ok(n) says valid)."""
    below = next((n for n in range(value, 0, -1) if ok(n)), None)
    above = next(n for n in range(max(value, 1), value + limit) if ok(n))
    return " or ".join(str(n) for n in dict.fromkeys(x for x in (below, above) if x is not None))


def parse_size(text: str) -> tuple[int, int]:
    """'576x1024' -> (576, 1024): a clip size as the command line writes it."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size {text!r} is not HxW in pixels, e.g. 576x1024")
    return int(parts[0]), int(parts[1])


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["DiTConfig", "VAEConfig", "T5Config", "ModelConfig", "PRESETS", "DEFAULT_CLIPS", "DEFAULT_FPS",
           "get_preset", "parse_size"]
