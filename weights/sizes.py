"""What the tensors say, checked against what a release's config.json says (issue 25, defect 9).

Real releases leave sizes out of their configs (Wan's original DiT config.json has no text_dim), and a
config.json can disagree with the weights beside it. So a converter reads every size the tensors hold,
takes it where the config is silent, and refuses, naming both files, where the config says otherwise.
Parts not converted (`--parts`) are fitted to the ones that are, never the reverse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from model.config import PRESETS, DiTConfig, VAEConfig

from .wan_dit import JSON_KEYS, dit_sizes
from .wan_vae import describe_version, vae_config_from_state_dict, wan_version

# VAE fields the tensors determine (the level layout and latent statistics they cannot).
_VAE_FIELDS = ("latent_channels", "in_channels", "base_channels", "decoder_base_channels", "residual",
               "patch")


def checked_dit_config(cfg: DiTConfig, sd: Mapping[str, torch.Tensor], layout: str, config: dict,
                       config_path: Path, weights: Path) -> DiTConfig:
    """cfg (from config.json) with every size the tensors hold; a size the json states differently is an
    error naming both files."""
    sizes = dit_sizes(sd, layout)
    for field, value in sizes.items():
        key = JSON_KEYS[layout].get(field)
        said = config.get(key) if key is not None else getattr(cfg, field)  # diffusers: heads x head dim
        if said is not None and said != value:
            name = key or "num_attention_heads x attention_head_dim"
            raise ValueError(f"{config_path} says {name} = {said}, but the weights in {weights} hold "
                             f"{field} {value}; the config does not belong to these weights")
    return dataclasses.replace(cfg, **sizes)


def checked_vae_config(cfg: VAEConfig | None, sd: Mapping[str, torch.Tensor], layout: str,
                       config_path: Path | None, weights: Path) -> VAEConfig:
    """The VAE config of these tensors (version, widths, latent channels); with a config.json (cfg), that
    config, which must agree with them."""
    try:
        held = vae_config_from_state_dict(sd, layout)
    except ValueError as err:
        raise ValueError(f"{weights}: {err}") from None
    if cfg is None:
        return held
    bad = [f"{f} {getattr(cfg, f)!r} (weights: {getattr(held, f)!r})" for f in _VAE_FIELDS
           if getattr(cfg, f) != getattr(held, f)]
    if wan_version(cfg) != wan_version(held):
        bad.insert(0, f"a {describe_version(wan_version(cfg))} where the weights are a "
                      f"{describe_version(wan_version(held))}")
    if bad:
        raise ValueError(f"{config_path} does not describe the weights in {weights}: " + "; ".join(bad))
    return cfg


def fit_parts(configs: dict, files: Mapping, notes: list[str]) -> None:
    """Converted parts must fit each other: a DiT and a VAE of different channel counts is an error naming
    the VAE file and the VAE the DiT wants. Parts not converted are fitted to the converted ones, so one
    part converts alone: a DiT takes the VAE's latent channels and the text encoder's width; a VAE is the
    Wan VAE of the DiT's channels; a text encoder takes the DiT's text width."""
    dit, vae, t5 = configs["dit"], configs["vae"], configs["t5"]
    if "dit" in files and "vae" in files and dit.in_channels != vae.latent_channels:
        preset = _wan_vae_of(dit.in_channels)
        want = f"the {describe_version(wan_version(preset))}" if preset else \
            f"a VAE of {dit.in_channels} channels"
        raise ValueError(f"{files['vae'].weights} is a Wan {wan_version(vae)} VAE with {vae.latent_channels} "
                         f"latent channels, but the DiT ({files['dit'].weights}) takes {dit.in_channels}: "
                         f"give {want}")
    if "dit" not in files:
        wanted = {"in_channels": vae.latent_channels, "out_channels": vae.latent_channels, "text_dim": t5.dim}
        fixes = {k: v for k, v in wanted.items() if getattr(dit, k) != v}
        if fixes:
            configs["dit"] = dataclasses.replace(dit, **fixes)
            notes.append(f"the DiT is not converted; its recorded config takes {fixes} from the converted "
                         "parts")
        return
    if "vae" not in files and vae.latent_channels != dit.in_channels and _wan_vae_of(dit.in_channels):
        configs["vae"] = _wan_vae_of(dit.in_channels)
        notes.append(f"the VAE is not converted; recorded as the Wan VAE of {dit.in_channels} channels")
    if "t5" not in files and t5.dim != dit.text_dim:
        configs["t5"] = dataclasses.replace(t5, dim=dit.text_dim)
        notes.append(f"the text encoder is not converted; its recorded width is the DiT's text_dim "
                     f"{dit.text_dim}")


def _wan_vae_of(channels: int) -> VAEConfig | None:
    """The Wan VAE preset with this many latent channels (16: Wan 2.1's, 48: Wan 2.2's)."""
    return next((PRESETS[n].vae for n in ("wan2.1-14b", "wan2.2-ti2v-5b")
                 if PRESETS[n].vae.latent_channels == channels), None)
