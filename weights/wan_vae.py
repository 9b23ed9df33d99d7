"""Wan 2.1 and Wan 2.2 VAE weights -> our `model.vae.VAE`: explicit key maps, strict conversion.

Two source layouts, each in two versions (Wan 2.2, `Wan2.2_VAE.pth`, nests each level's residual blocks
and resampler in one block: `encoder.downsamples.{i}.downsamples.{b}`, `decoder.upsamples.{j}.upsamples.{b}`;
diffusers `down_blocks.{i}.resnets.{b}` / `.downsampler`, `up_blocks.{j}.resnets.{b}` / `.upsampler`):
- "wan": the original checkpoint (Wan2.1_VAE.pth; `wan/modules/vae.py` of Wan-Video/Wan2.1):
  `encoder.conv1`, flat `encoder.downsamples.{k}` (residual blocks `residual.{0,2,3,6}` =
  norm1, conv1, norm2, conv2, plus `shortcut`; resamplers `resample.1`, `time_conv`),
  `encoder.middle.{0,1,2}` (res, attention, res), `encoder.head.{0,2}`, `conv1`/`conv2`
  (quant / post-quant), and the decoder likewise with flat `decoder.upsamples.{k}`.
- "diffusers": `AutoencoderKLWan` (`encoder.down_blocks.{k}`, `decoder.up_blocks.{j}.resnets.{b}`,
  `decoder.up_blocks.{j}.upsamplers.0`, `mid_block.{resnets,attentions}`, `norm_out`, `conv_out`,
  `quant_conv`, `post_quant_conv`).
Both store RMS norm gains as `gamma` of shape (C, 1, 1[, 1]); ours is `weight` of shape (C,).
Every name is built from the config; nothing is matched by substring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from model.config import PRESETS, VAEConfig
from model.vae import VAE

SOURCES = ("wan", "diffusers")

# Residual-block parameter names: ours -> per-source suffix.
_RES = {
    "wan": {"norm1.weight": "residual.0.gamma", "conv1": "residual.2", "norm2.weight": "residual.3.gamma",
            "conv2": "residual.6", "shortcut": "shortcut"},
    "diffusers": {"norm1.weight": "norm1.gamma", "conv1": "conv1", "norm2.weight": "norm2.gamma",
                  "conv2": "conv2", "shortcut": "conv_shortcut"},
}
_ATTN = {"norm.weight": "norm.gamma", "to_qkv": "to_qkv", "proj": "proj"}


def _expand(src: str, ours: str) -> list[tuple[str, str]]:
    """A conv-like pair (weight + bias) or a single parameter (names ending in .weight/.gamma)."""
    if ours.endswith(".weight"):
        return [(src, ours)]
    return [(f"{src}.weight", f"{ours}.weight"), (f"{src}.bias", f"{ours}.bias")]


def _res_block(src: str, ours: str, source: str, our_keys: set[str]) -> list[tuple[str, str]]:
    pairs = []
    for our_name, src_name in _RES[source].items():
        if our_name == "shortcut" and f"{ours}.shortcut.weight" not in our_keys:
            continue
        pairs += _expand(f"{src}.{src_name}", f"{ours}.{our_name}")
    return pairs


def _attn_block(src: str, ours: str) -> list[tuple[str, str]]:
    return [pair for ours_name, src_name in _ATTN.items()
            for pair in _expand(f"{src}.{src_name}", f"{ours}.{ours_name}")]


def _resampler(src: str, ours: str, our_keys: set[str]) -> list[tuple[str, str]]:
    pairs = []
    for our_name, src_name in (("spatial", "resample.1"), ("temporal", "time_conv")):
        if f"{ours}.{our_name}.weight" in our_keys:
            pairs += _expand(f"{src}.{src_name}", f"{ours}.{our_name}")
    return pairs


def wan_version(cfg: VAEConfig) -> str:
    """"2.2" for the residual VAE behind a space-to-depth stem, else "2.1"."""
    return "2.2" if cfg.residual else "2.1"


def check_wan_layout(cfg: VAEConfig) -> int:
    """Raise ValueError unless cfg has Wan 2.1's or Wan 2.2's VAE layout; return its num_res_blocks."""
    n, nrb = len(cfg.channel_mult), cfg.encoder_blocks[0]
    v22 = cfg.residual
    wanted = {
        "patch": (cfg.patch, (1, 2) if v22 else (1, 1)),
        "patch_order": (cfg.patch_order, "wh" if v22 else "hw"),
        "norm": (cfg.norm, "rms"),
        "padding": (cfg.padding, "zeros"),
        "mid_attention": (cfg.mid_attention, True),
        "decoder_adaptive_norm": (cfg.decoder_adaptive_norm, False),
        "kl": (cfg.kl, True),
        "encoder_blocks": (cfg.encoder_blocks, (nrb,) * n),
        "decoder_blocks": (cfg.decoder_blocks, (nrb + 1,) * n),
        "space_strides": (cfg.space_strides, (2,) * (n - 1) + (1,)),
        "time_strides[-1]": (cfg.time_strides[-1], 1),
    }
    bad = [f"{k}={got!r} (Wan: {want!r})" for k, (got, want) in wanted.items() if got != want]
    if not v22 and cfg.decoder_base_channels not in (None, cfg.base_channels):
        bad.append(f"decoder_base_channels={cfg.decoder_base_channels!r} (Wan 2.1: {cfg.base_channels})")
    if bad:
        raise ValueError(f"VAE config does not have Wan {wan_version(cfg)}'s layout: " + ", ".join(bad))
    return nrb


def _our_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        vae = VAE(cfg)
    return {k: v.shape for k, v in vae.state_dict().items()}


def wan_vae_keymap(cfg: VAEConfig, source: str) -> dict[str, str]:
    """{source key: our key} for a Wan-layout VAE config; source is "wan" or "diffusers"."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    nrb, n = check_wan_layout(cfg), len(cfg.channel_mult)
    ours = set(_our_shapes(cfg))
    wan = source == "wan"
    pairs: list[tuple[str, str]] = []
    for part in ("encoder", "decoder"):  # conv_in, mid block, head
        pairs += _expand(f"{part}.conv1" if wan else f"{part}.conv_in", f"{part}.conv_in")
        mid = f"{part}.middle" if wan else f"{part}.mid_block"
        pairs += _res_block(f"{mid}.0" if wan else f"{mid}.resnets.0", f"{part}.mid.block1", source, ours)
        pairs += _attn_block(f"{mid}.1" if wan else f"{mid}.attentions.0", f"{part}.mid.attn")
        pairs += _res_block(f"{mid}.2" if wan else f"{mid}.resnets.1", f"{part}.mid.block2", source, ours)
        norm_out = f"{part}.head.0.gamma" if wan else f"{part}.norm_out.gamma"
        pairs += _expand(norm_out, f"{part}.norm_out.weight")
        pairs += _expand(f"{part}.head.2" if wan else f"{part}.conv_out", f"{part}.conv_out")
    pairs += _expand("conv1" if wan else "quant_conv", "quant_conv")
    pairs += _expand("conv2" if wan else "post_quant_conv", "post_quant_conv")

    if cfg.residual:
        return _checked(pairs + _levels_22(n, nrb, source, ours), ours)
    k = 0  # encoder: one flat list of residual blocks and resamplers, in both sources
    flat = "encoder.downsamples" if wan else "encoder.down_blocks"
    for i in range(n):
        for b in range(nrb):
            pairs += _res_block(f"{flat}.{k}", f"encoder.levels.{i}.blocks.{b}", source, ours)
            k += 1
        if i < n - 1:
            pairs += _resampler(f"{flat}.{k}", f"encoder.levels.{i}.down", ours)
            k += 1

    k = 0  # decoder, deepest level first: blocks of level i, then the upsampler into level i - 1
    for j, i in enumerate(reversed(range(n))):
        for b in range(nrb + 1):
            src = f"decoder.upsamples.{k}" if wan else f"decoder.up_blocks.{j}.resnets.{b}"
            pairs += _res_block(src, f"decoder.levels.{i}.blocks.{b}", source, ours)
            k += 1
        if i > 0:
            src = f"decoder.upsamples.{k}" if wan else f"decoder.up_blocks.{j}.upsamplers.0"
            pairs += _resampler(src, f"decoder.levels.{i - 1}.up", ours)
            k += 1
    return _checked(pairs, ours)


def _levels_22(n: int, nrb: int, source: str, ours: set[str]) -> list[tuple[str, str]]:
    """Wan 2.2: one source block per level, holding its residual blocks and then its resampler."""
    wan, pairs = source == "wan", []
    for i in range(n):
        src = f"encoder.downsamples.{i}.downsamples" if wan else f"encoder.down_blocks.{i}.resnets"
        for b in range(nrb):
            pairs += _res_block(f"{src}.{b}", f"encoder.levels.{i}.blocks.{b}", source, ours)
        down = f"{src}.{nrb}" if wan else f"encoder.down_blocks.{i}.downsampler"
        pairs += _resampler(down, f"encoder.levels.{i}.down", ours)
    for j, i in enumerate(reversed(range(n))):  # deepest level first: its blocks, then the upsampler below
        src = f"decoder.upsamples.{j}.upsamples" if wan else f"decoder.up_blocks.{j}.resnets"
        for b in range(nrb + 1):
            pairs += _res_block(f"{src}.{b}", f"decoder.levels.{i}.blocks.{b}", source, ours)
        if i > 0:
            up = f"{src}.{nrb + 1}" if wan else f"decoder.up_blocks.{j}.upsampler"
            pairs += _resampler(up, f"decoder.levels.{i - 1}.up", ours)
    return pairs


def _checked(pairs: list[tuple[str, str]], ours: set[str]) -> dict[str, str]:
    keymap = dict(pairs)
    targets = list(keymap.values())
    dup = sorted({t for t in targets if targets.count(t) > 1})
    uncovered = sorted(ours - set(targets))
    if dup or uncovered or len(keymap) != len(pairs):
        raise ValueError(f"internal key map error: duplicated targets {dup}, "
                         f"unmapped keys of ours {uncovered}")
    return keymap


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def convert_wan_vae(state_dict: Mapping[str, torch.Tensor], source: str,
                    cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE state dict from a Wan 2.1 or 2.2 VAE state dict ("wan" original or "diffusers" layout).

    Strict: raises ValueError listing missing and unexpected keys and shape mismatches
    (key: expected vs got). Norm gains (C, 1, 1[, 1]) are flattened to (C,); nothing else changes.
    """
    check_version(state_dict, source, cfg)
    keymap = wan_vae_keymap(cfg, source)
    shapes = _our_shapes(cfg)
    missing = sorted(k for k in keymap if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in keymap)
    out, mismatched = {}, []
    for src, ours in keymap.items():
        if src not in state_dict:
            continue
        v = state_dict[src]
        if src.endswith(".gamma") and v.ndim > 1 and all(d == 1 for d in v.shape[1:]):
            v = v.reshape(v.shape[0])
        if v.shape != shapes[ours]:
            mismatched.append(f"{src} -> {ours}: expected {tuple(shapes[ours])}, got {tuple(v.shape)}")
            continue
        out[ours] = v
    if missing or unexpected or mismatched:
        parts = [_listing(t, x) for t, x in (("missing", missing), ("unexpected", unexpected),
                                              ("shape mismatches", mismatched)) if x]
        raise ValueError(f"Wan VAE checkpoint ({source} layout) does not fit this config: "
                         + "; ".join(parts))
    return out


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """VAEConfig for a diffusers AutoencoderKLWan config dict: Wan 2.1's layout, or Wan 2.2's
    (`is_residual` with `patch_size` 2; its in/out_channels count the 12 space-to-depth channels)."""
    c = dict(config)
    n = len(c.get("dim_mult", [1, 2, 4, 4]))
    temporal = list(c.get("temperal_downsample", [False, True, True]))
    base = c.get("base_dim", 96)
    residual, p = bool(c.get("is_residual", False)), c.get("patch_size") or 1
    unsupported = {"attn_scales": (list(c.get("attn_scales", [])), [])}
    bad = [f"{k}={got!r} (supported: {ok!r})" for k, (got, ok) in unsupported.items() if got != ok]
    if (residual, p) not in ((False, 1), (True, 2)):
        bad.append(f"is_residual={residual} with patch_size={c.get('patch_size')!r} (Wan 2.1: False with "
                   "none, Wan 2.2: True with 2)")
    if not residual and (c.get("decoder_base_dim") or base) != base:
        bad.append(f"decoder_base_dim={c['decoder_base_dim']!r} without is_residual (Wan 2.1: {base})")
    if len(temporal) != n - 1:
        bad.append(f"temperal_downsample has {len(temporal)} entries for {n} levels (want {n - 1})")
    if c.get("out_channels", 3) != c.get("in_channels", 3) or c.get("in_channels", 3) % (p * p):
        bad.append(f"out_channels={c.get('out_channels')}, in_channels={c.get('in_channels')} (want equal, "
                   f"a multiple of patch_size^2 = {p * p})")
    if bad:
        raise ValueError("unsupported AutoencoderKLWan config: " + ", ".join(bad))
    nrb = c.get("num_res_blocks", 2)
    mean, std = c.get("latents_mean"), c.get("latents_std")
    dec_base = c.get("decoder_base_dim") or base
    return VAEConfig(
        in_channels=c.get("in_channels", 3) // (p * p), latent_channels=c.get("z_dim", 16),
        base_channels=base, channel_mult=tuple(c.get("dim_mult", [1, 2, 4, 4])), encoder_blocks=(nrb,) * n,
        decoder_blocks=(nrb + 1,) * n,  # Wan's decoder levels hold num_res_blocks + 1 blocks
        time_strides=tuple(2 if t else 1 for t in temporal) + (1,), space_strides=(2,) * (n - 1) + (1,),
        padding="zeros", norm="rms", decoder_adaptive_norm=False, mid_attention=True, kl=True,
        latents_mean=None if mean is None else tuple(mean),
        latents_std=None if std is None else tuple(std),
        residual=residual, patch=(1, p), patch_order="wh" if p > 1 else "hw",
        decoder_base_channels=dec_base if dec_base != base else None,
    )


# A key only one version of a layout has: what tells a Wan 2.1 VAE file from a Wan 2.2 one.
_VERSION_KEYS = {
    ("wan", "2.1"): "encoder.downsamples.0.residual.0.gamma",
    ("wan", "2.2"): "encoder.downsamples.0.downsamples.0.residual.0.gamma",
    ("diffusers", "2.1"): "encoder.down_blocks.0.norm1.gamma",
    ("diffusers", "2.2"): "encoder.down_blocks.0.resnets.0.norm1.gamma",
}
_QUANT = {"wan": ("conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight"),
          "diffusers": ("quant_conv.weight", "post_quant_conv.weight", "encoder.conv_in.weight",
                        "decoder.conv_out.weight")}


def sniff_version(state_dict: Mapping[str, torch.Tensor], source: str) -> str | None:
    """"2.1" or "2.2" from the keys of a Wan VAE state dict in `source` layout; None when neither fits."""
    return next((v for (src, v), key in _VERSION_KEYS.items() if src == source and key in state_dict), None)


def _encoder_levels(sd: Mapping[str, torch.Tensor], source: str,
                    version: str) -> tuple[list[int], int, tuple[int, ...]]:
    """(width of each encoder level, residual blocks per level, time strides) read from the keys: the
    encoder is a run of residual blocks and resamplers (flat in Wan 2.1, one block per level in 2.2)."""
    wan = source == "wan"
    conv1 = "residual.2" if wan else "conv1"
    entries = []  # ("block", width) or ("down", time stride), in order
    for i in range(64):
        if version == "2.1":
            flat = f"encoder.{'downsamples' if wan else 'down_blocks'}.{i}"
            blocks, down = [flat], flat
        else:
            level = f"encoder.{'downsamples' if wan else 'down_blocks'}.{i}"
            inner = f"{level}.downsamples" if wan else f"{level}.resnets"
            blocks = [f"{inner}.{b}" for b in range(64) if f"{inner}.{b}.{conv1}.weight" in sd]
            down = f"{inner}.{len(blocks)}" if wan else f"{level}.downsampler"
        found = [sd[f"{b}.{conv1}.weight"].shape[0] for b in blocks if f"{b}.{conv1}.weight" in sd]
        entries += [("block", w) for w in found]
        if f"{down}.resample.1.weight" in sd:
            entries.append(("down", 2 if f"{down}.time_conv.weight" in sd else 1))
        elif not found:
            break
    levels, widths, strides = [[]], [], []
    for kind, value in entries:
        if kind == "down":
            strides.append(value)
            levels.append([])
        else:
            levels[-1].append(value)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"a Wan {version} VAE whose encoder levels hold {[len(v) for v in levels]} residual "
                         "blocks; Wan's hold the same number each")
    widths = [level[-1] for level in levels]
    return widths, counts.pop(), (*strides, 1)


def describe_version(version: str) -> str:
    return {"2.1": "Wan 2.1 VAE (Wan2.1_VAE.pth: 16 latent channels, 4x8x8)",
            "2.2": "Wan 2.2 VAE (Wan2.2_VAE.pth: 48 latent channels, 4x16x16, residual)"}[version]


def check_version(state_dict: Mapping[str, torch.Tensor], source: str, cfg: VAEConfig) -> None:
    """One clear line when a Wan 2.1 VAE is given where the config wants Wan 2.2's, or the reverse."""
    got, want = sniff_version(state_dict, source), wan_version(cfg)
    if got is not None and got != want:
        raise ValueError(f"this is a {describe_version(got)}, but a {describe_version(want)} was expected; "
                         f"give the Wan {want} VAE file for this model")


def vae_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> VAEConfig:
    """The Wan VAE config these tensors hold: the version from the keys, the widths and latent channels
    from the tensors; the level layout (and the latent statistics, which no tensor holds) from that
    version's preset. The strict conversion checks every other shape."""
    version = sniff_version(state_dict, source)
    if version is None:
        keys = ", ".join(v for (src, _), v in _VERSION_KEYS.items() if src == source)
        raise ValueError(f"not a Wan VAE in the {source} layout: it has none of {keys}")
    preset = PRESETS["wan2.2-ti2v-5b" if version == "2.2" else "wan2.1-14b"].vae
    widths, nrb, time_strides = _encoder_levels(state_dict, source, version)
    quant, post, conv_in, conv_out = (state_dict.get(k) for k in _QUANT[source])
    if any(t is None for t in (quant, post, conv_in, conv_out)):
        raise ValueError(f"a Wan {version} VAE in the {source} layout lacks one of "
                         f"{', '.join(_QUANT[source])}")
    z, p, n, base = post.shape[0], preset.patch[1], len(widths), conv_in.shape[0]
    if any(w % base for w in widths):
        raise ValueError(f"a Wan {version} VAE whose level widths {widths} are not multiples of {base}")
    mult = tuple(w // base for w in widths)
    dec_base = conv_out.shape[1] // mult[0]
    stats = z == preset.latent_channels
    return dataclasses.replace(
        preset, latent_channels=z, in_channels=conv_in.shape[1] // (p * p), base_channels=base,
        channel_mult=mult, encoder_blocks=(nrb,) * n, decoder_blocks=(nrb + 1,) * n,
        time_strides=time_strides, space_strides=(2,) * (n - 1) + (1,),
        decoder_base_channels=dec_base if dec_base != base else None,
        latents_mean=preset.latents_mean if stats else None,
        latents_std=preset.latents_std if stats else None)
