"""Wan 2.1 VAE converter: parity with diffusers' AutoencoderKLWan, key coverage at full size."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS
from model.vae import VAE
from weights.wan_vae import convert_wan_vae, vae_config_from_diffusers, wan_vae_keymap

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

TOL = 1e-4  # fp32 max abs error
SMALL = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
             latents_std=[1.5, 0.7, 2.0, 1.0])
SIZE = (32, 48)  # non-square; latent 4 x 6



@pytest.fixture(scope="module")
def pair():
    """(diffusers reference with every parameter random, norm gains included; ours converted from it)."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**SMALL).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = VAE(cfg).eval()
    ours.load_state_dict(convert_wan_vae(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref, ours


def clip(frames: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, frames, *SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@torch.no_grad()
def test_vae_parity_diffusers_encode(pair, frames):
    ref, ours = pair
    x = clip(frames, seed=frames)
    dist = ref.encode(x).latent_dist  # diffusers encodes frame 0, then chunks of 4, with a feature cache
    mean, logvar = ours.encode_dist(x)  # whole video at once
    assert mean.shape == dist.mean.shape == (1, 4, 1 + (frames - 1) // 4, 4, 6)
    err = max((mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item())
    assert err <= TOL, f"{frames} frames: encode max abs err {err:.2e} > {TOL}"


@torch.no_grad()
def test_vae_parity_diffusers_streamed_encode(pair):
    ref, ours = pair
    x = clip(17, seed=3)
    err = (ours.encode_dist(x, chunk=4)[0] - ref.encode(x).latent_dist.mean).abs().max().item()
    assert err <= TOL, f"streamed encode max abs err {err:.2e} > {TOL}"


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@torch.no_grad()
def test_vae_parity_diffusers_decode(pair, frames):
    ref, ours = pair
    t = 1 + (frames - 1) // 4
    z = torch.randn(1, 4, t, 4, 6, generator=torch.Generator().manual_seed(frames))  # normalized latent
    expected = ref.decode(z * ours.latents_std + ours.latents_mean).sample  # pipelines denormalize outside
    got = ours.decode(z)
    assert got.shape == expected.shape == (1, 3, frames, *SIZE)
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"{frames} frames: decode max abs err {err:.2e} > {TOL}"


@pytest.fixture(scope="module")
def full_size():
    """Full-size Wan 2.1 VAE: diffusers' state dict shapes (meta device) and our config."""
    with torch.device("meta"):
        ref = AutoencoderKLWan()
    return ref.state_dict(), PRESETS["wan2.1-14b"].vae


def test_config_from_diffusers_default_is_wan_preset():
    with torch.device("meta"):
        ref = AutoencoderKLWan()  # diffusers' defaults are Wan 2.1's VAE
    assert vae_config_from_diffusers(dict(ref.config)) == PRESETS["wan2.1-14b"].vae


def test_keymap_covers_full_size_diffusers(full_size):
    sd, cfg = full_size
    keymap = wan_vae_keymap(cfg, "diffusers")
    with torch.device("meta"):
        ours = VAE(cfg).state_dict()
    assert set(keymap) == set(sd)  # every diffusers key mapped, none left over
    assert sorted(keymap.values()) == sorted(ours)  # onto every key of ours, each exactly once
    converted = convert_wan_vae(sd, "diffusers", cfg)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}
    with torch.device("meta"):
        VAE(cfg).load_state_dict(converted, strict=True, assign=True)


def test_keymap_original_layout_agrees_with_diffusers_conversion(full_size):
    """Our map of the original Wan2.1_VAE.pth names, checked against diffusers' own converter."""
    sd, cfg = full_size
    wan, dif = wan_vae_keymap(cfg, "wan"), wan_vae_keymap(cfg, "diffusers")
    assert len(wan) == len(dif) == len(sd)
    wan_sd = {}
    for wan_key, our_key in wan.items():
        (dif_key,) = convert_wan_vae_to_diffusers({wan_key: torch.empty(0)})
        assert dif.get(dif_key) == our_key, f"{wan_key} -> {dif_key} -> {dif.get(dif_key)}, not {our_key}"
        wan_sd[wan_key] = sd[dif_key]  # the original checkpoint holds the same tensor under its own name
    assert set(convert_wan_vae(wan_sd, "wan", cfg)) == set(dif.values())


def test_convert_reports_missing_unexpected_and_shape_errors(pair):
    ref, ours = pair
    sd = dict(ref.state_dict())
    sd.pop("encoder.conv_in.bias")
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3, 1)
    with pytest.raises(ValueError) as e:
        convert_wan_vae(sd, "diffusers", ours.cfg)
    msg = str(e.value)
    assert "missing (1): encoder.conv_in.bias" in msg
    assert "unexpected (1): encoder.extra.weight" in msg
    assert ("decoder.conv_out.weight -> decoder.conv_out.weight: expected (3, 8, 3, 3, 3), "
            "got (3, 8, 3, 3, 1)") in msg


def test_non_wan_layout_is_rejected():
    with pytest.raises(ValueError, match=r"norm='group' \(Wan: 'rms'\).*padding='replicate'"):
        wan_vae_keymap(PRESETS["paper"].vae, "diffusers")
    with pytest.raises(ValueError, match="unknown source"):
        wan_vae_keymap(PRESETS["wan2.1-14b"].vae, "comfy")
    with pytest.raises(ValueError, match="is_residual=True"):
        vae_config_from_diffusers({**SMALL, "is_residual": True})
