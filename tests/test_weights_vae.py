"""Wan 2.1 and 2.2 VAE converters: parity with diffusers' AutoencoderKLWan, key coverage at full size."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS
from model.vae import VAE
from weights.wan_vae import (
    convert_wan_vae,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    wan_vae_keymap,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

TOL = 1e-4  # fp32 max abs error
SMALL = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
             latents_std=[1.5, 0.7, 2.0, 1.0])
SIZE = (32, 48)  # non-square; latent 4 x 6 (2.1), 2 x 3 (2.2)
# Wan 2.2's fields at a small size: residual resampling, a 2x2 space-to-depth stem (12 channels), its own
# decoder width; every residual shortcut regroups channels (8 -> 8 x 4, 8 -> 16 x 8, ...).
SMALL_22 = {**SMALL, "is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
            "decoder_base_dim": 12, "scale_factor_spatial": 16}


def randomized(ref):
    """Every parameter of a diffusers VAE random, norm gains included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return ref


def convert_pair(fields: dict):
    """(diffusers reference with every parameter random; ours converted from it)."""
    torch.manual_seed(0)
    ref = randomized(AutoencoderKLWan(**fields).eval())
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = VAE(cfg).eval()
    ours.load_state_dict(convert_wan_vae(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return convert_pair(SMALL)


@pytest.fixture(scope="module")
def pair22():
    return convert_pair(SMALL_22)


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


# ------------------------------------------------------------------------------------------- Wan 2.2


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@torch.no_grad()
def test_vae22_parity_diffusers_encode(pair22, frames):
    ref, ours = pair22
    assert ours.cfg.residual and ours.cfg.patch == (1, 2) and ours.cfg.space_compression == 16
    x = clip(frames, seed=frames)
    dist = ref.encode(x).latent_dist  # diffusers: frame 0, then chunks of 4, through its feature cache
    mean, logvar = ours.encode_dist(x)  # whole video at once
    assert mean.shape == dist.mean.shape == (1, 4, 1 + (frames - 1) // 4, 2, 3)
    err = max((mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item())
    assert err <= TOL, f"{frames} frames: encode max abs err {err:.2e} > {TOL}"
    streamed = ours.encode_dist(x, chunk=4)[0]
    assert (streamed - dist.mean).abs().max().item() <= TOL


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@torch.no_grad()
def test_vae22_parity_diffusers_decode(pair22, frames):
    ref, ours = pair22
    t = 1 + (frames - 1) // 4
    z = torch.randn(1, 4, t, 2, 3, generator=torch.Generator().manual_seed(frames))  # normalized latent
    expected = ref.decode(z * ours.latents_std + ours.latents_mean).sample  # one latent frame at a time
    got = ours.decode(z)
    assert got.shape == expected.shape == (1, 3, frames, *SIZE)
    err = max((got - expected).abs().max().item(), (ours.decode(z, chunk=1) - expected).abs().max().item())
    assert err <= TOL, f"{frames} frames: decode max abs err {err:.2e} > {TOL}"


def test_vae22_preset_matches_diffusers_wan22_config():
    """Wan 2.2's VAE as diffusers builds it (its conversion script's vae22 config) is our preset's."""
    want = PRESETS["wan2.2-ti2v-5b"].vae
    config = dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                  decoder_base_dim=256, scale_factor_temporal=4, scale_factor_spatial=16, patch_size=2,
                  latents_mean=list(want.latents_mean), latents_std=list(want.latents_std))
    assert vae_config_from_diffusers(config) == want
    with torch.device("meta"):
        sd = AutoencoderKLWan(**config).state_dict()
    keymap = wan_vae_keymap(want, "diffusers")
    with torch.device("meta"):
        ours = VAE(want).state_dict()
    assert set(keymap) == set(sd) and sorted(keymap.values()) == sorted(ours)  # every key once, both ways
    converted = convert_wan_vae(sd, "diffusers", want)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}
    assert vae_config_from_state_dict(sd, "diffusers") == want


def original_22_key(key: str, nrb: int = 2) -> str:
    """diffusers' Wan 2.2 VAE key -> the original Wan2.2_VAE.pth key, written out independently of our map
    (the inverse of diffusers' scripts/convert_wan_to_diffusers.py convert_vae_22)."""
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
             "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
             "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
             "decoder.conv_out": "decoder.head.2"}
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    p = key.split(".")
    stem = ".".join(p[:-1])
    if stem in fixed:
        return f"{fixed[stem]}.{p[-1]}"
    if p[1] == "mid_block":  # resnets.0 / attentions.0 / resnets.1 -> middle.0 / 1 / 2
        i = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[2]}.{p[3]}"]
        rest = p[4:] if p[2] == "attentions" else [res[p[4]], *p[5:]]
        return ".".join([p[0], "middle", str(i), *rest])
    outer, inner = ("downsamples", "downsamples") if p[0] == "encoder" else ("upsamples", "upsamples")
    if p[3] == "resnets":
        return ".".join([p[0], outer, p[2], inner, p[4], res[p[5]], *p[6:]])
    n_res = nrb if p[0] == "encoder" else nrb + 1  # the resampler follows the level's residual blocks
    return ".".join([p[0], outer, p[2], inner, str(n_res), *p[4:]])


def test_vae22_original_layout_keymap():
    cfg = PRESETS["wan2.2-ti2v-5b"].vae
    with torch.device("meta"):
        sd = AutoencoderKLWan(**{**SMALL_22, "base_dim": 160, "z_dim": 48, "dim_mult": [1, 2, 4, 4],
                                 "num_res_blocks": 2, "decoder_base_dim": 256, "latents_mean": None,
                                 "latents_std": None}).state_dict()
    wan, dif = wan_vae_keymap(cfg, "wan"), wan_vae_keymap(cfg, "diffusers")
    assert {original_22_key(k): dif[k] for k in sd} == wan
    original = {original_22_key(k): v for k, v in sd.items()}
    assert set(convert_wan_vae(original, "wan", cfg)) == set(dif.values())
    assert vae_config_from_state_dict(original, "wan") == cfg


@torch.no_grad()
def test_vae22_original_layout_parity(pair22):
    ref, ours = pair22
    original = {original_22_key(k, nrb=1): v for k, v in ref.state_dict().items()}
    again = VAE(ours.cfg).eval()
    again.load_state_dict(convert_wan_vae(original, "wan", ours.cfg), strict=True)
    x = clip(5, seed=2)
    assert torch.equal(again.encode_dist(x)[0], ours.encode_dist(x)[0])


def test_wrong_vae_version_is_one_clear_line(pair, pair22):
    (ref21, ours21), (ref22, ours22) = pair, pair22
    with pytest.raises(ValueError) as e:
        convert_wan_vae(ref21.state_dict(), "diffusers", ours22.cfg)
    msg = str(e.value)
    assert "\n" not in msg and "this is a Wan 2.1 VAE" in msg and "a Wan 2.2 VAE" in msg and "expected" in msg
    with pytest.raises(ValueError, match=r"this is a Wan 2\.2 VAE .* but a Wan 2\.1 VAE .* was expected"):
        convert_wan_vae(ref22.state_dict(), "diffusers", ours21.cfg)
