"""Wan 2.2 T2V-A14B: the preset, the two experts (model/experts.py), the expert switch with per-stage guidance
against diffusers' WanPipeline, converters from both layouts, loading, personalization and export."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from model.config import PRESETS, DiTConfig, ModelConfig
from model.dit import DiT
from model.experts import ExpertPair, serves_high
from sample.sampler import euler_sample, sample_latents, time_grid
from tests.makers import SMALL_PAIR

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


def test_preset_switches_at_the_step_wan_does():
    """At the preset's 40 steps and shift 12 our Euler grid hands over after the same step as Wan's own
    (wan/utils/fm_solvers_unipc.py: sigmas linspace(0.999, 0, n + 1)[:-1], shifted, timesteps
    int64(1000 sigma)) and diffusers' UniPCMultistepScheduler(use_flow_sigmas, flow_shift 12): 26
    high-noise steps of 40."""
    import numpy as np

    cfg = PRESETS["wan2.2-t2v-a14b"]
    n, s = cfg.sample_steps, cfg.sample_shift
    ours = int(serves_high(time_grid(n, s)[:n], cfg.boundary).sum())
    sigmas = np.linspace(0.999, 0, n + 1)[:-1]
    wan = int(((s * sigmas / (1 + (s - 1) * sigmas) * 1000).astype(np.int64) >= cfg.boundary * 1000).sum())
    unipc = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=s)
    unipc.set_timesteps(n)
    theirs = int((unipc.timesteps >= cfg.boundary * 1000).sum())
    assert ours == wan == theirs == 26


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
    per_token = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.5, 0.5]])  # first-frame tokens at t = 0
    v = pair(x[:2], per_token, ctx[:2])
    assert v[:, 0, 0, 0, 0].tolist() == [1.0, -1.0] and high.calls[1].tolist() == [[0.0, 1.0, 1.0]]


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


# ------------------------------------------------------------------------------------------ converters

# diffusers' AutoencoderKLWan / transformers' UMT5 configs the tiny releases carry (configs only: the
# tests convert the two experts, and the other parts lend their config.json as in a --parts dit run).
_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
_UMT5 = dict(vocab_size=100, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2)


def _convert(src, out, layout, *extra) -> int:
    from setseq.cli import main

    return main(["convert", "--from", layout, str(src), "--out", str(out), "--dtype", "fp32", *extra])


def _diffusers_release(root: Path, boundary: float | None = 0.9) -> tuple[Path, dict]:
    transformers = pytest.importorskip("transformers")
    refs = {"high": _reference(0), "low": _reference(1)}
    refs["high"].save_pretrained(root / "transformer")
    refs["low"].save_pretrained(root / "transformer_2", max_shard_size="20KB")  # sharded, as the real one
    diffusers.AutoencoderKLWan(**_VAE).save_config(root / "vae")
    transformers.UMT5Config(**_UMT5).save_pretrained(root / "text_encoder")
    index = {"_class_name": "WanPipeline", "boundary_ratio": boundary,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, refs


@torch.no_grad()
def test_diffusers_a14b_release_converts_both_experts(tmp_path, capsys):
    from weights.checkpoint import load_checkpoint

    src, refs = _diffusers_release(tmp_path / "Wan2.2-T2V-tiny-Diffusers")
    out = tmp_path / "ckpt"
    assert _convert(src, out, "diffusers", "--parts", "dit") == 0
    assert "two experts (high- and low-noise), boundary 0.9: a custom size" in capsys.readouterr().out
    m = load_checkpoint(out, parts=("dit",))
    assert isinstance(m.dit, ExpertPair) and m.cfg.boundary == 0.9 and m.cfg.name == "wan2.2-custom"
    assert (m.cfg.guidance, m.cfg.low_noise_guidance, m.cfg.sample_shift) == (4.0, 3.0, 12.0)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    for t, ref in ((0.95, refs["high"]), (0.3, refs["low"])):  # each time reaches its own expert
        want = ref(x, torch.tensor([t * 1000]), ctx, return_dict=False)[0]
        err = (m.dit(x, torch.tensor([t]), ctx) - want).abs().max().item()
        # diffusers' fp32 sinusoidal time embedding vs our float64 one (tests/test_weights_dit.py)
        assert err <= 1e-4, f"expert at t {t}: max abs error {err:.2e} > 1e-4"


def _original_release(root: Path, sp_model_path) -> tuple[Path, ExpertPair]:
    from model.t5 import T5Encoder
    from weights.io import write_safetensors_atomic

    cfg = dataclasses.replace(PRESETS["wan2.1-1.3b"].dit, dim=24, heads=2, layers=2, ffn_dim=40, text_dim=32)
    pair = ExpertPair(DiT(cfg), DiT(cfg), 0.875)
    with torch.no_grad():
        for p in pair.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    for sub, expert in (("high_noise_model", pair.high), ("low_noise_model", pair.low)):
        (root / sub).mkdir(parents=True)
        write_safetensors_atomic(root / sub / "diffusion_pytorch_model.safetensors", expert.state_dict())
        (root / sub / "config.json").write_text(json.dumps({
            "_class_name": "WanModel", "dim": 24, "eps": 1e-6, "ffn_dim": 40, "freq_dim": 256, "in_dim": 16,
            "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 16, "text_len": 512,
            "text_dim": 32}))
    t5_cfg = dataclasses.replace(PRESETS["tiny"].t5, vocab_size=50, dim=32, per_layer_position_bias=True)
    t5 = T5Encoder(t5_cfg)
    torch.save(t5.state_dict(), root / "models_t5_umt5-xxl-enc-bf16.pth")
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(sp_model_path, root / "google" / "umt5-xxl" / "spiece.model")
    return root, pair


@torch.no_grad()
def test_original_a14b_release_converts_both_experts(tmp_path, sp_model_path, capsys):
    from weights.checkpoint import load_checkpoint

    src, pair = _original_release(tmp_path / "Wan2.2-T2V-tiny", sp_model_path)
    out = tmp_path / "ckpt"
    assert _convert(src, out, "wan", "--parts", "dit,t5") == 0
    assert "boundary 0.875" in capsys.readouterr().out
    m = load_checkpoint(out, parts=("dit", "t5"))
    assert isinstance(m.dit, ExpertPair) and m.cfg.boundary == 0.875
    for ours, theirs in ((m.dit.high, pair.high), (m.dit.low, pair.low)):
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    assert main_info(out).count("dit_low.safetensors") == 1


def main_info(folder: Path) -> str:
    import contextlib
    import io

    from setseq.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info", str(folder), "--frames", "5", "--size", "32x32"]) == 0
    return buf.getvalue()


@pytest.mark.parametrize("layout, remove, message", [
    ("wan", "low_noise_model", r"no low_noise_model/ folder for the low-noise expert; expected both "
                               r"high_noise_model/ and low_noise_model/"),
    ("wan", "high_noise_model", r"no high_noise_model/ folder for the high-noise expert"),
    ("wan", "low_noise_model/config.json", r"low_noise_model has no config\.json for the low-noise expert"),
    ("diffusers", "transformer_2", r"no transformer_2/ folder for the low-noise expert; expected both "
                                   r"transformer/ and transformer_2/"),
    ("diffusers", "transformer/diffusion_pytorch_model.safetensors",
     r"transformer holds no weights for the high-noise expert"),
])
def test_a_missing_expert_is_named(tmp_path, sp_model_path, capsys, layout, remove, message):
    src = tmp_path / "src"
    if layout == "wan":
        _original_release(src, sp_model_path)
    else:
        _diffusers_release(src)
    target = src / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert _convert(src, tmp_path / "out", layout, "--parts", "dit") == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a14b_key_coverage_full_size():
    """Both experts of the full-size preset, built on the meta device: the diffusers and original key maps
    take every key of transformer/ and transformer_2/ (high_noise_model/, low_noise_model/) onto the pair's
    keys, each once, shapes equal; the releases' configs are recognised as the preset."""
    from weights.convert import model_config
    from weights.wan_dit import dit_config_from_diffusers, dit_config_from_wan, wan_dit_keymap

    preset = PRESETS["wan2.2-t2v-a14b"]
    cfg = preset.dit
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            patch_size=cfg.patch, num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.layers)
        pair = ExpertPair(DiT(cfg), DiT(cfg), preset.boundary)
    ours = {k: tuple(v.shape) for k, v in pair.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for layout in ("diffusers", "wan"):
        keymap = wan_dit_keymap(cfg, layout)
        src_shapes = theirs if layout == "diffusers" else {o: ours[f"high.{o}"] for o in keymap.values()}
        assert keymap.keys() == src_shapes.keys()
        mapped = [f"{expert}.{o}" for expert in ("high", "low") for o in keymap.values()]
        assert sorted(mapped) == sorted(ours)  # every key of the pair, each once
        assert all(src_shapes[k] == ours[f"{e}.{o}"] for e in ("high", "low") for k, o in keymap.items())
    wan_json = {"_class_name": "WanModel", "dim": 5120, "eps": 1e-6, "ffn_dim": 13824, "freq_dim": 256,
                "in_dim": 16, "model_type": "t2v", "num_heads": 40, "num_layers": 40, "out_dim": 16,
                "text_len": 512}  # the release's high_noise_model/config.json (low_noise_model/ the same)
    assert dit_config_from_wan(wan_json) == cfg and dit_config_from_diffusers(ref.config) == cfg
    notes = []
    assert model_config({"dit": cfg, "dit_low": cfg, "vae": preset.vae, "t5": preset.t5}, notes) == preset
    assert notes == ["two experts (high- and low-noise), boundary 0.875: the DiT matches preset "
                     "wan2.2-t2v-a14b"]
    with pytest.raises(ValueError, match="the two experts' DiT configs differ"):
        model_config({"dit": cfg, "dit_low": dataclasses.replace(cfg, layers=30), "vae": preset.vae,
                      "t5": preset.t5}, [])
    # and `setseq info --preset` counts both experts
    from setseq.cmd_info import collect

    info = collect(preset, 81, 720, 1280)
    assert info["dit_params"] == 2 * sum(p.numel() for p in pair.high.parameters())


# ------------------------------------------------------------------------------------ personalization


def _pair_base(sp_model_path):
    from model.base import Base
    from model.t5 import T5Encoder
    from model.tokenizer import Tokenizer
    from model.vae import VAE

    pair = ExpertPair(_random_dit(0), _random_dit(1), SMALL_PAIR.boundary)
    tokenizer = Tokenizer(sp_model_path, first_added_id=SMALL_PAIR.t5.vocab_size)
    torch.manual_seed(2)
    return Base(SMALL_PAIR, pair, VAE(SMALL_PAIR.vae), T5Encoder(SMALL_PAIR.t5), tokenizer, "a14b-test")


def _video(tmp_path) -> str:
    from train.video import write_video

    video = torch.full((3, 9, 32, 32), -0.4)
    for i in range(9):
        video[0, i, 8:20, 2 * i: 2 * i + 12] = 1.0
    path = tmp_path / "square.mp4"
    write_video(path, video, fps=8)
    return str(path)


def _record_times(pair: ExpertPair) -> dict[str, list[float]]:
    seen = {"high": [], "low": []}
    for name in seen:
        pair.expert(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].extend(args[1].tolist()))
    return seen


@pytest.mark.parametrize("expert", ["both", "high"])
def test_personalize_trains_each_expert_on_the_times_it_serves(tmp_path, sp_model_path, expert):
    """Both stages train the adapters of the experts asked for, each on times it serves; --expert high leaves
    the low-noise expert without an adapter and never runs it."""
    from lora.concept import load_concept
    from train import personalize as P
    from train.config import ConceptSpec, PersonalizeConfig

    base = _pair_base(sp_model_path)
    seen = _record_times(base.dit)
    cfg = PersonalizeConfig(concepts=[ConceptSpec(_video(tmp_path), "a [v] square.", "It is [u] moving.")],
                            out=str(tmp_path / "c.safetensors"), steps1=3, steps2=3, batch_size=4, rank=4,
                            prior_count=0, checkpoint_every=3, log_every=3, progress=False, expert=expert)
    concept = load_concept(P.main(cfg, base))
    experts = {m.split(".", 1)[0] for m in concept.modules}
    assert experts == ({"high", "low"} if expert == "both" else {"high"})
    for name in experts:  # stage 1 moved B1, stage 2 moved B2, on every expert that trains
        for tensor in ("lora_B1", "lora_B2"):
            assert any(concept.lora[k].abs().max() > 0 for k in concept.lora
                       if k.startswith(f"{name}.") and k.endswith(tensor)), (name, tensor)
    assert seen["high"] and all(t >= 0.875 for t in seen["high"])
    assert all(t < 0.875 for t in seen["low"]) and (bool(seen["low"]) == (expert == "both"))


def test_expert_flag_needs_a_two_expert_base(tmp_path, sp_model_path):
    from train.config import ConceptSpec, PersonalizeConfig

    with pytest.raises(ValueError, match="expert 'middle' is not one of"):
        PersonalizeConfig(concepts=[ConceptSpec("v.mp4", "a [v] square.", "")], out="c.safetensors",
                          expert="middle")
    from model.base import Base
    from train import personalize as P

    base = _pair_base(sp_model_path)
    one = Base(dataclasses.replace(SMALL_PAIR, boundary=None, low_noise_guidance=None), base.dit.high,
               base.vae, base.t5, base.tokenizer, "one")
    cfg = PersonalizeConfig(concepts=[ConceptSpec(_video(tmp_path), "a [v] square.", "")],
                            out=str(tmp_path / "c.safetensors"), prior_count=0, expert="low", progress=False)
    with pytest.raises(ValueError, match="--expert low: base one has one DiT"):
        P.check_inputs(cfg, one)


# ------------------------------------------------------------------------------------------- export


def _pair_concept(pair: ExpertPair):
    from lora.concept import base_identity, concept_from_model
    from lora.inject import DEFAULT_TARGETS, concept_state_dict, inject_lora

    targets = tuple(r"(high|low)\." + p for p in DEFAULT_TARGETS)
    inject_lora(pair, targets, rank=3, name="dancer")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in concept_state_dict(pair, "dancer").values():
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return concept_from_model(pair, "dancer", base_identity(pair, "a14b-tiny"), targets=targets)


@torch.no_grad()
def test_exported_a14b_concept_loads_into_both_diffusers_experts(tmp_path, capsys):
    """`setseq export` writes one file per expert; diffusers' WanPipeline loads the high-noise file into
    `transformer` and the low-noise file with load_into_transformer_2=True, and both experts then match ours
    with the concept applied (identity 0.7, motion 1.3 baked in)."""
    pytest.importorskip("peft")
    from lora.concept import save_concept
    from lora.inject import set_scales
    from setseq.cli import main
    from weights.io import read_safetensors

    refs = {"high": _reference(0), "low": _reference(1)}
    pair = ExpertPair(_ours(refs["high"]), _ours(refs["low"]), 0.875)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g)
    times = {"high": 0.95, "low": 0.3}
    before = {e: refs[e](x, torch.tensor([t * 1000]), ctx, return_dict=False)[0] for e, t in times.items()}
    save_concept(tmp_path / "dancer.safetensors", _pair_concept(pair))
    set_scales(pair, identity=0.7, motion=1.3)
    want = {e: pair(x, torch.tensor([t]), ctx) for e, t in times.items()}

    files = {}
    for fmt in ("comfyui", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(tmp_path / "dancer.safetensors"), "--format", fmt, "--identity", "0.7",
                     "--motion", "1.3", "--out", str(out)]) == 0
        files[fmt] = {e: tmp_path / f"{fmt}.{e}_noise.safetensors" for e in times}
        assert all(p.is_file() for p in files[fmt].values()) and not out.exists()
    assert "high-noise expert, 40 keys" in capsys.readouterr().out
    for fmt in ("comfyui", "diffusers"):
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                     transformer=_reference(0), transformer_2=_reference(1),
                                     boundary_ratio=0.875)
        pipe.load_lora_weights(read_safetensors(files[fmt]["high"]), adapter_name="dancer")
        pipe.load_lora_weights(read_safetensors(files[fmt]["low"]), adapter_name="dancer",
                               load_into_transformer_2=True)
        for expert, model in (("high", pipe.transformer), ("low", pipe.transformer_2)):
            got = model(x, torch.tensor([times[expert] * 1000]), ctx, return_dict=False)[0]
            err = (got - want[expert]).abs().max().item()
            moved = (want[expert] - before[expert]).abs().max().item()
            assert moved > 0.05, f"the concept barely moves the {expert}-noise expert ({moved:.2e})"
            # diffusers' fp32 time embedding vs our float64 one accounts for ~1e-5 (tests/test_export.py)
            assert err <= 1e-4, f"{fmt} {expert}-noise expert: max abs error {err:.2e} > 1e-4"


def test_export_of_a_two_expert_concept_needs_an_expert():
    from lora.export import export_lora

    concept = _pair_concept(ExpertPair(_random_dit(0), _random_dit(1), 0.875))
    with pytest.raises(ValueError, match="belong to a two-expert base.*expert='high' and expert='low'"):
        export_lora(concept, "comfyui")
    high = export_lora(concept, "comfyui", expert="high")
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in high
    assert torch.equal(high["diffusion_model.blocks.1.ffn.2.lora_A.weight"],
                       concept.lora["high.blocks.1.ffn.2.lora_A1"])


def test_personalize_and_generate_cli_on_a_two_expert_folder(pair_base, tmp_path, capsys, monkeypatch):
    """--expert low trains the low-noise expert alone; the prior is sampled with the base's own per-stage
    guidance (4 high, 3 low); generate applies the concept to the pair."""
    import sample.sampler as sampler
    from lora.concept import load_concept
    from setseq.cli import main

    calls = []
    real = sampler.euler_sample
    monkeypatch.setattr(sampler, "euler_sample", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    folder, _ = pair_base
    out = tmp_path / "c.safetensors"
    assert main(["personalize", _video(tmp_path), "--prompt", "a [v] square.", "--motion-prompt",
                 "It is [u] moving.", "--base", str(folder), "--out", str(out), "--steps1", "1",
                 "--steps2", "1", "--prior-count", "1", "--prior-per-batch", "1", "--batch-size", "2",
                 "--rank", "2", "--expert", "low", "--device", "cpu"]) == 0
    assert {m.split(".", 1)[0] for m in load_concept(out).modules} == {"low"}
    assert calls and all((kw["guidance"], kw["low_noise_guidance"], kw["boundary"]) == (4.0, 3.0, 0.875)
                         for kw in calls)
    capsys.readouterr()
    assert main(["generate", "--base", str(folder), "--concept", str(out), "--prompt",
                 "a [v] square. It is [u] moving.", "--frames", "5", "--size", "32x32", "--no-progress",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    assert "rank 2, 20 layers" in capsys.readouterr().out  # both blocks x 10 linears of the low expert
