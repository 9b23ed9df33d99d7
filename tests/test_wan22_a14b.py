"""Wan 2.2 T2V-A14B: the preset, the two experts (model/experts.py), the expert switch with per-stage guidance
against diffusers' WanPipeline, converters from both layouts, loading, personalization and export."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from model.config import PRESETS, DiTConfig, ModelConfig
from model.dit import DiT
from model.experts import ExpertPair, serves_high
from sample.sampler import euler_sample, sample_latents, time_grid

diffusers = pytest.importorskip("diffusers")

# A tiny WanTransformer3DModel (diffusers' own Wan tests use sizes like these).
REF = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _reference(seed: int):
    """A tiny diffusers Wan DiT with every parameter random (zero-initialized head and tables included)."""
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(**REF).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref


def _ours(ref) -> DiT:
    from weights.wan_dit import convert_wan_dit, dit_config_from_diffusers

    cfg = dit_config_from_diffusers(ref.config)
    model = DiT(cfg).eval()
    model.load_state_dict(convert_wan_dit(ref.state_dict(), "diffusers", cfg), strict=True)
    return model


# ------------------------------------------------------------------------------------------ the preset


def test_a14b_preset_matches_wan22_config():
    """wan/configs/wan_t2v_A14B.py: dim 5120, 40 heads, 40 layers, ffn 13824, shift 12, 40 steps,
    boundary 0.875, sample_guide_scale (3.0, 4.0) = (low noise, high noise); the Wan 2.1 VAE and umT5-XXL."""
    cfg = PRESETS["wan2.2-t2v-a14b"]
    wan21 = PRESETS["wan2.1-14b"]
    assert (cfg.dit.dim, cfg.dit.heads, cfg.dit.layers, cfg.dit.ffn_dim) == (5120, 40, 40, 13824)
    assert cfg.dit == wan21.dit and cfg.vae == wan21.vae and cfg.t5 == wan21.t5
    assert (cfg.sample_shift, cfg.sample_steps, cfg.boundary) == (12.0, 40, 0.875)
    assert (cfg.guidance, cfg.low_noise_guidance) == (4.0, 3.0)
    assert cfg.experts == 2 and wan21.experts == 1
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_bad_expert_fields():
    base = PRESETS["wan2.1-1.3b"]
    with pytest.raises(ValueError, match="boundary 1.5 must lie strictly between 0 and 1"):
        ModelConfig(**{**base.__dict__, "boundary": 1.5})
    with pytest.raises(ValueError, match="low_noise_guidance 3.0 needs a second expert"):
        ModelConfig(**{**base.__dict__, "low_noise_guidance": 3.0})


# ------------------------------------------------------------------------------------------ the switch


def test_boundary_is_compared_as_wan_does():
    """t * 1000 >= boundary * 1000 is the high-noise expert, the boundary itself included."""
    t = torch.tensor([1.0, 0.9, 0.875, 0.87499, 0.5, 0.0])
    assert serves_high(t, 0.875).tolist() == [True, True, True, False, False, False]
    # Wan truncates its timesteps to int64 first: the same decision for every t on a fine grid.
    fine = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for boundary in (0.875, 0.9):
        wan = (fine * 1000).to(torch.int64) >= boundary * 1000
        assert torch.equal(serves_high(fine, boundary), wan)


class _Recorder(torch.nn.Module):
    """A DiT stand-in returning a constant velocity per expert, recording the times it is called at."""

    def __init__(self, value: float):
        super().__init__()
        self.cfg = DiTConfig()
        self.value, self.calls = value, []

    def forward(self, x, t, context, context_mask=None, self_cond=None):
        self.calls.append(t.clone())
        return torch.full_like(x, self.value)


def test_pair_routes_each_sample_by_its_time():
    high, low = _Recorder(1.0), _Recorder(-1.0)
    pair = ExpertPair(high, low, 0.875)
    x, ctx = torch.zeros(4, 16, 1, 2, 2), torch.zeros(4, 3, 64)
    v = pair(x, torch.tensor([1.0, 0.125, 0.875, 0.5]), ctx)
    assert v[:, 0, 0, 0, 0].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert high.calls[0].tolist() == [1.0, 0.875] and low.calls[0].tolist() == [0.125, 0.5]


def test_sampler_switches_guidance_with_the_expert():
    """A grid point exactly on the boundary (shift 1, 8 steps: t = 0.875) is a high-noise step."""
    high, low = _Recorder(1.0), _Recorder(-1.0)
    pair = ExpertPair(high, low, 0.875)
    ctx = torch.zeros(1, 3, 64)
    euler_sample(pair, torch.zeros(1, 16, 1, 2, 2), steps=8, shift=1.0, guidance=4.0, low_noise_guidance=3.0,
                 context=ctx, uncond_context=ctx, boundary=0.875, progress=False)
    assert [float(c[0]) for c in high.calls] == [1.0, 0.875]
    assert len(low.calls) == 6 and all(float(c[0]) < 0.875 for c in low.calls)
    with pytest.raises(ValueError, match="needs an expert boundary"):
        euler_sample(high, (1, 16, 1, 2, 2), steps=2, guidance=4.0, low_noise_guidance=3.0, context=ctx,
                     uncond_context=ctx, progress=False)


@torch.no_grad()
def test_expert_switch_and_guidance_match_wan_pipeline():
    """Our sampler on the two experts vs diffusers' WanPipeline(transformer, transformer_2, boundary_ratio)
    with guidance_scale / guidance_scale_2: the same random tiny experts, the same starting latents and prompt
    embeddings. The pipeline's FlowMatchEulerDiscreteScheduler (Euler, as ours) is given our grid: its
    set_timesteps gets sigmas = linspace(1, 0, n + 1)[:n] and applies its own shift 12."""
    high_ref, low_ref = _reference(0), _reference(1)
    pair = ExpertPair(_ours(high_ref), _ours(low_ref), 0.875)
    steps, shift = 8, 12.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps,
                                                sigmas=torch.linspace(1, 0, steps + 1)[:steps].tolist())
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                 transformer=high_ref, transformer_2=low_ref, boundary_ratio=0.875)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 3, 4, 6, generator=g)  # latent grid T=3, H=4, W=6
    cond, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    uncond = torch.cat([uncond, torch.zeros(1, 2, 32)], dim=1)  # Wan pads prompts with zeros to one length

    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), height=32, width=48,
                num_frames=9, num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0,
                output_type="latent", return_dict=False)[0]
    got = sample_latents(pair, noise.clone(), (cond, None), (uncond, None), steps=steps, guidance=4.0,
                         shift=shift, low_noise_guidance=3.0)
    # Both experts served and both guidance scales mattered: the comparison below would catch a wrong switch.
    high_steps = int(serves_high(time_grid(steps, shift)[:steps], 0.875).sum())
    assert 0 < high_steps < steps
    one_guidance = sample_latents(pair, noise.clone(), (cond, None), (uncond, None), steps=steps,
                                  guidance=4.0, shift=shift)
    err = (got - want).abs().max().item()
    moved = (one_guidance - want).abs().max().item()
    print(f"A14B sampler vs WanPipeline: max abs error {err:.2e} (|x| ~ {want.abs().max():.1f}), "
          f"{high_steps}/{steps} high-noise steps; one guidance for both stages differs by {moved:.2e}")
    assert moved > 1e-2
    # Achieved 5.1e-6: diffusers' fp32 timestep embedding vs our float64 one (tests/test_weights_dit.py).
    assert err <= 1e-4, f"max abs error {err:.2e} > 1e-4"


# ------------------------------------------------------------------------------- checkpoint and generate

_TINY = PRESETS["tiny"]
SMALL_PAIR = dataclasses.replace(
    _TINY, name="a14b-test",
    dit=dataclasses.replace(_TINY.dit, dim=64, heads=2, layers=2, ffn_dim=128, rope_split=(12, 10, 10),
                            self_cond=False, prediction="velocity"),
    t5=dataclasses.replace(_TINY.t5, layers=1),
    sample_shift=12.0, guidance=4.0, low_noise_guidance=3.0, boundary=0.875, sample_steps=4)


def _random_dit(seed: int) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(SMALL_PAIR.dit)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)  # a zero head would give v = 0 whatever the expert
    return dit


@pytest.fixture(scope="module")
def pair_base(tmp_path_factory, sp_model_path):
    from model.t5 import T5Encoder
    from model.vae import VAE
    from weights.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("a14b") / "base"
    pair = ExpertPair(_random_dit(0), _random_dit(1), SMALL_PAIR.boundary)
    torch.manual_seed(2)
    save_checkpoint(folder, SMALL_PAIR, pair, VAE(SMALL_PAIR.vae), T5Encoder(SMALL_PAIR.t5),
                    tokenizer_path=sp_model_path)
    return folder, pair


def test_checkpoint_folder_holds_both_experts(pair_base):
    from weights.checkpoint import describe_checkpoint, load_checkpoint, read_checkpoint_config

    folder, pair = pair_base
    assert read_checkpoint_config(folder)["parts"] == {
        "dit": "dit.safetensors", "dit_low": "dit_low.safetensors", "vae": "vae.safetensors",
        "t5": "text_encoder.safetensors"}
    loaded = load_checkpoint(folder)
    assert isinstance(loaded.dit, ExpertPair) and loaded.dit.boundary == 0.875 and loaded.cfg == SMALL_PAIR
    for ours, theirs in ((loaded.dit.high, pair.high), (loaded.dit.low, pair.low)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
    assert load_checkpoint(folder, parts=("vae",)).dit is None
    text = "\n".join(describe_checkpoint(folder))
    assert "high-noise (dit) for t >= 0.875 at guidance 4.0, low-noise (dit_low) below at guidance 3.0" \
        in text
    assert "[dit_low] dit_low.safetensors" in text


def test_missing_low_noise_file_is_named(pair_base, tmp_path):
    import shutil

    from weights.checkpoint import load_checkpoint

    folder = Path(shutil.copytree(pair_base[0], tmp_path / "base"))
    (folder / "dit_low.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dit_low.safetensors is missing.*dit_low weights"):
        load_checkpoint(folder)


def test_generate_cli_switches_experts(pair_base, tmp_path, capsys):
    from setseq.cli import main

    folder, _ = pair_base
    args = ["generate", "--base", str(folder), "--prompt", "a red square moving right.", "--frames", "5",
            "--size", "32x32", "--no-progress", "--out", str(tmp_path / "v.mp4")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 steps, guidance 4 (high-noise expert; low-noise expert below t 0.875 at 3)" in out
    assert main([*args[:-1], str(tmp_path / "w.mp4"), "--guidance", "5"]) == 0
    assert "guidance 5 (high-noise expert; low-noise expert below t 0.875 at 5)" in capsys.readouterr().out
