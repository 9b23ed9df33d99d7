"""Wan 2.2 TI2V-5B: the preset, the 48-channel DiT and its per-token timestep against diffusers'
WanTransformer3DModel, and image-to-video sampling (the first latent frame kept, its tokens at t = 0) against
diffusers' WanImageToVideoPipeline(expand_timesteps=True) on the same tiny random DiT and Wan 2.2 VAE."""

from __future__ import annotations

import copy
import functools

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.base import Base
from model.config import PRESETS, ModelConfig, T5Config
from model.dit import DiT
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer
from model.vae import VAE
from sample.generate import GenerateConfig, Pipeline, generate
from sample.sampler import euler_sample, sample_latents
from setseq.cli import main as cli_main
from train import personalize as P
from train.config import ConceptSpec, PersonalizeConfig
from train.video import write_video
from weights.base import load_base
from weights.checkpoint import save_checkpoint
from weights.wan_dit import convert_wan_dit, dit_config_from_diffusers
from weights.wan_vae import convert_wan_vae, vae_config_from_diffusers

diffusers = pytest.importorskip("diffusers")

# A tiny 48-channel WanTransformer3DModel (the TI2V-5B's channel count at diffusers' test sizes).
REF = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48,
           out_channels=48, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# A tiny Wan 2.2 VAE with 48 latent channels (residual resampling, 2x2 stem: 4x16x16 compression).
VAE22 = dict(base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
             out_channels=12, decoder_base_dim=12, scale_factor_spatial=16, latents_mean=[0.1] * 48,
             latents_std=[0.8] * 48)
TOL = 1e-4  # fp32 max abs error


def _random(module, seed: int, scale: float | None = 0.2):
    """Every parameter random: N(0, scale), or (scale None) fan-in scaled weights and small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1 and scale is None:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((scale or 0.05) * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def dit_pair():
    ref = _random(diffusers.WanTransformer3DModel(**REF), seed=0)
    cfg = dit_config_from_diffusers(ref.config)
    ours = DiT(cfg).eval()
    ours.load_state_dict(convert_wan_dit(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def vae_pair():
    ref = _random(diffusers.AutoencoderKLWan(**VAE22), seed=1, scale=None)
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = VAE(cfg).eval()
    ours.load_state_dict(convert_wan_vae(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref, ours


def test_ti2v_preset_matches_wan22_config():
    """wan/configs/wan_ti2v_5B.py: dim 3072, 24 heads, 30 layers, ffn 14336, in/out 48, shift 5, 50 steps,
    guidance 5, 121 frames; the Wan 2.2 VAE (vae_stride (4, 16, 16), z 48) and umT5-XXL."""
    cfg = PRESETS["wan2.2-ti2v-5b"]
    d = cfg.dit
    assert (d.dim, d.heads, d.layers, d.ffn_dim) == (3072, 24, 30, 14336)
    assert (d.in_channels, d.out_channels) == (48, 48)
    assert (d.patch, d.text_dim, d.freq_dim) == ((1, 2, 2), 4096, 256)
    assert (cfg.vae.time_compression, cfg.vae.space_compression, cfg.vae.latent_channels) == (4, 16, 48)
    assert cfg.t5 == PRESETS["wan2.1-14b"].t5
    assert (cfg.sample_shift, cfg.sample_steps, cfg.guidance) == (5.0, 50, 5.0)
    assert cfg.default_clip == (121, 704, 1280) and cfg.default_fps == 24.0  # sample_fps
    assert cfg.token_grid(121, (704, 1280)) == (31, 22, 40)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 3, 4, 6, generator=g)  # latent grid T=3, H=4, W=6 -> 3 x 2 x 3 = 18 tokens
    context = torch.randn(2, 7, 32, generator=g)
    context[0, 4:] = 0  # zero-padded text, as Wan feeds it
    return x, context


@torch.no_grad()
def test_dit48_parity_diffusers_per_sample_and_per_token(dit_pair):
    ref, ours = dit_pair
    x, context = _inputs()
    t = torch.tensor([0.3, 0.9])
    per_token = t[:, None].repeat(1, 18)
    per_token[:, :6] = 0  # frame 0's 2 x 3 tokens: a clean first frame (Wan 2.2 TI2V)
    per_token[1, 10] = 0.55  # and any other pattern: each token its own time
    errors = []
    for tt in (t, per_token):
        want = ref(x, tt * 1000, context, return_dict=False)[0]  # diffusers' timestep is 0..1000
        got = ours(x, tt, context)
        errors.append((want - got).abs().max().item())
    print(f"48-channel DiT vs diffusers: per sample {errors[0]:.2e}, per token {errors[1]:.2e}")
    assert max(errors) <= TOL, errors
    # the per-token path is not the per-sample one: frame 0's tokens moved
    assert (ours(x, per_token, context) - ours(x, t, context)).abs().max() > 1e-2


def test_per_token_time_is_refused_where_it_cannot_work(dit_pair):
    _, ours = dit_pair
    x, context = _inputs()
    with pytest.raises(ValueError, match=r"per token \(2, 18\)"):
        ours(x, torch.zeros(2, 17), context)


class _Recorder(torch.nn.Module):
    """A DiT stand-in: velocity = x, recording each call's t."""

    def __init__(self):
        super().__init__()
        self.cfg = dit_config_from_diffusers(REF)
        self.calls = []

    def forward(self, x, t, context, context_mask=None, self_cond=None):
        self.calls.append(t.clone())
        return x.clone()


def test_sampler_keeps_the_first_frame_exactly_and_gives_its_tokens_t0():
    model = _Recorder()
    g = torch.Generator().manual_seed(0)
    noise, first = torch.randn(2, 48, 3, 4, 6, generator=g), torch.randn(1, 48, 1, 4, 6, generator=g)
    ctx = torch.zeros(2, 3, 32)
    before = noise.clone()
    out = euler_sample(model, noise, steps=4, shift=5.0, context=ctx, first_frame=first, progress=False)
    assert torch.equal(noise, before)  # the caller's noise is left alone
    assert torch.equal(out[:, :, :1], first.expand(2, -1, -1, -1, -1))  # bit for bit
    assert not torch.equal(out[:, :, 1:], noise[:, :, 1:])
    for t in model.calls:
        assert t.shape == (2, 18) and (t[:, :6] == 0).all() and (t[:, 6:] == t[:, 6:7]).all()
    assert float(model.calls[0][0, 6]) == 1.0
    with pytest.raises(ValueError, match=r"first_frame must be the latent of one frame"):
        euler_sample(model, noise, steps=1, context=ctx, first_frame=first[:, :, :, :2], progress=False)


@torch.no_grad()
def test_image_to_video_matches_diffusers_i2v_pipeline(dit_pair, vae_pair):
    """WanImageToVideoPipeline(expand_timesteps=True), Wan 2.2 TI2V's path: the image VAE-encoded as frame 0,
    kept through sampling, its tokens at timestep 0; CFG 5, shift 5. Ours: the same image through our VAE,
    then sample_latents(first_frame=...). The scheduler is given our time grid (sigmas linspace(1, 0))."""
    from PIL import Image

    (ref, ours), (ref_vae, our_vae) = dit_pair, vae_pair
    steps, shift, guidance, size, frames = 6, 5.0, 5.0, (64, 96), 9
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps,
                                                sigmas=torch.linspace(1, 0, steps + 1)[:steps].tolist())
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=ref_vae,
                                             scheduler=scheduler, transformer=ref, expand_timesteps=True)
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(*size, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    noise = torch.randn(1, 48, 3, 4, 6, generator=g)
    cond, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    want = pipe(image=Image.fromarray(pixels), prompt_embeds=cond, negative_prompt_embeds=uncond,
                latents=noise.clone(), height=size[0], width=size[1], num_frames=frames,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                return_dict=False)[0]

    image = torch.from_numpy(np.asarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    first = our_vae.encode(image[None, :, None])  # (1, 48, 1, 4, 6) normalized
    got = sample_latents(ours, noise.clone(), (cond, None), (uncond, None), steps=steps, guidance=guidance,
                         shift=shift, first_frame=first)
    err = (got - want).abs().max().item()
    print(f"TI2V image-to-video vs WanImageToVideoPipeline: max abs err {err:.2e} "
          f"(|x| ~ {want.abs().max():.1f})")
    assert err <= TOL
    assert torch.equal(got[:, :, :1], first)
    # the condition mattered: without it the video's later frames differ
    plain = sample_latents(ours, noise.clone(), (cond, None), (uncond, None), steps=steps, guidance=guidance,
                           shift=shift)
    assert (plain[:, :, 1:] - want[:, :, 1:]).abs().max() > 100 * TOL


# ------------------------------------------------------------------- generate --image, personalization


def tiny_ti2v(dit_pair, vae_pair) -> ModelConfig:
    """A TI2V-shaped base at test size: the 48-channel DiT and Wan 2.2 VAE above, a 1-layer T5."""
    return ModelConfig(name="wan2.2-ti2v-tiny", dit=dit_pair[1].cfg, vae=vae_pair[1].cfg,
                       t5=T5Config(dim=32, layers=1, max_length=16), sample_shift=5.0, guidance=5.0,
                       sample_steps=2)


@pytest.fixture(scope="module")
def ti2v_folder(tmp_path_factory, sp_model_path, dit_pair, vae_pair):
    folder = tmp_path_factory.mktemp("ti2v") / "base"
    cfg = tiny_ti2v(dit_pair, vae_pair)
    torch.manual_seed(0)
    save_checkpoint(folder, cfg, dit_pair[1], vae_pair[1], T5Encoder(cfg.t5), tokenizer_path=sp_model_path)
    return folder


@torch.no_grad()
def test_generate_with_an_image_keeps_its_frame(ti2v_folder, vae_pair):
    pipe = Pipeline.of(load_base(str(ti2v_folder), device="cpu"))
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 1, 32, 64, generator=g) * 2 - 1
    gen = GenerateConfig(frames=5, size=(32, 64), steps=2)
    video = generate(pipe, "a red ball", gen, progress=False, image=image)
    vae = vae_pair[1]
    frame0 = vae.decode(vae.encode(image[None]))[0, :, :1]  # the image through the VAE, decoded alone
    assert video.shape == (3, 5, 32, 64)
    assert (video[:, :1] - frame0).abs().max() <= 1e-5  # causal decoder: frame 0 reads latent frame 0 only
    other = generate(pipe, "a red ball", gen, progress=False, image=-image)
    assert (other[:, 1:] - video[:, 1:]).abs().max() > 1e-3  # later frames follow the image


def test_cli_generate_image(ti2v_folder, tmp_path, capsys):
    png = tmp_path / "first.png"
    iio.imwrite(png, (torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy())
    args = ["generate", "--base", str(ti2v_folder), "--prompt", "a ball", "--frames", "5", "--size", "32x64",
            "--steps", "1", "--no-progress"]
    assert cli_main([*args, "--image", str(png), "--out", str(tmp_path / "v.mp4")]) == 0
    assert (tmp_path / "v.mp4").is_file() and "not trained for image-to-video" not in capsys.readouterr().out
    assert cli_main([*args, "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "w.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image" in err[0] and "none.png" in err[0], err
    assert not (tmp_path / "w.mp4").exists()


def test_cli_generate_image_refuses_an_x0_base(tmp_path, capsys):
    png = tmp_path / "first.png"
    iio.imwrite(png, (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    rc = cli_main(["generate", "--base", "tiny", "--prompt", "a red square", "--image", str(png),
                   "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--image" in err[0] and "cannot take a first frame" in err[0], err


def test_ti2v_personalizes_like_wan21(tmp_path, sp_model_path, dit_pair, vae_pair):
    """Both stages of a personalization run on the 48-channel DiT with the Wan 2.2 VAE (4x16x16)."""
    cfg = tiny_ti2v(dit_pair, vae_pair)
    torch.manual_seed(0)
    base = Base(cfg, copy.deepcopy(dit_pair[1]), copy.deepcopy(vae_pair[1]), T5Encoder(cfg.t5),
                Tokenizer(sp_model_path, first_added_id=cfg.t5.vocab_size), "ti2v-test")
    clip = torch.full((3, 9, 32, 32), -0.4)
    for i in range(9):
        clip[:, i, 8:20, i : i + 12] = 1.0
    write_video(tmp_path / "clip.mp4", clip, fps=8)
    spec = ConceptSpec(str(tmp_path / "clip.mp4"), "a [v] square.", "It is [u] moving.")
    pc = PersonalizeConfig(concepts=[spec], out=str(tmp_path / "c.safetensors"), steps1=2, steps2=2,
                           batch_size=2, rank=4, prior_count=0, checkpoint_every=100, log_every=1,
                           progress=False)
    P.main(pc, base, sample_latents)
    with safe_open(str(pc.out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert any(k.endswith("lora_B1") and v.abs().sum() > 0 for k, v in tensors.items())
    assert any(k.endswith("lora_B2") and v.abs().sum() > 0 for k, v in tensors.items())
    assert all(torch.isfinite(v).all() for v in tensors.values())
