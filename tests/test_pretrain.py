"""Pretraining the tiny base model (toyworld/pretrain.py), its evaluation (toyworld/evaluate.py), the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import PRESETS
from model.dit import DiT
from model.flow import add_noise, prediction_loss_per_sample
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer
from model.vae import VAE, patchify, unpatchify
from toyworld.evaluate import contact_sheet, motion_quality, report_markdown
from toyworld.pretrain import PretrainConfig, all_captions, build_tokenizer, caption_length, model_config
from toyworld.pretrain_dit import Bank, dit_loss, train_dit, train_head, train_layout
from toyworld.pretrain_loop import Log
from toyworld.pretrain_vae import heldout_clips, heldout_psnr, latent_stats, train_vae, vae_lr
from toyworld.world import ToyWorldConfig, generate_batch, to_model_video

LATENT = PRESETS["tiny"].dit.in_channels  # latent channels of the tiny preset

# A 9x32x32 world: latents 3x4x4, 12 tokens; small objects so everything fits.
SMALL = ToyWorldConfig(frames=9, size=32, radius=4.0, travel=10.0, orbit_radius=5.0, pair_travel=4.0,
                       pair_orbit_radius=2.0)
TINY = PRESETS["tiny"]
SMALL_DIT = dataclasses.replace(TINY.dit, dim=64, heads=2, layers=2, ffn_dim=128, rope_split=(16, 8, 8))


def _cfg(tmp_path, **kw) -> PretrainConfig:
    base = dict(work_dir=str(tmp_path), threads=1, world=SMALL, vae_steps=4, vae_full_steps=2, vae_batch=2,
                vae_full_batch=2, vae_crop=(5, 16), stats_clips=8, bank_size=16, dit_steps=40, batch=8,
                lr=2e-3, warmup=5, checkpoint_every=10, log_every=10, self_cond_prob=0.5, head_steps=4,
                layout_steps=4)
    return PretrainConfig(**{**base, **kw})


def _bank(n: int = 16, seed: int = 0) -> Bank:
    """Structured latents (a per-caption pattern, not noise) with caption ids: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, LATENT, 3, 4, 4, generator=g)
    which = torch.arange(n) % 4
    ids = torch.stack([torch.tensor([5 + int(w), 1, 0]) for w in which])
    mask = ids != 0
    return Bank(protos[which], ids, mask, torch.tensor([[1, 0, 0]]), torch.tensor([[True, False, False]]))


def _model_cfg():
    return dataclasses.replace(TINY, dit=SMALL_DIT)


def _losses(folder, stage: str = "dit") -> list[float]:
    return [r["loss"] for r in map(json.loads, open(folder / "pretrain.jsonl")) if r["stage"] == stage]


def test_x0_dit_returns_the_velocity_its_x0_implies():
    torch.manual_seed(0)
    dit = DiT(dataclasses.replace(SMALL_DIT, prediction="x0"))
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    x0, eps = torch.randn(2, LATENT, 3, 4, 4), torch.randn(2, LATENT, 3, 4, 4)
    t = torch.tensor([0.3, 0.8])
    x_t = add_noise(x0, eps, t)
    v = dit(x_t, t, torch.randn(2, 3, 64))
    x0_hat = x_t - t.view(-1, 1, 1, 1, 1) * v
    want = (x0_hat - x0).pow(2).flatten(1).mean(1)
    got = prediction_loss_per_sample(v, x_t, x0, eps, t, "x0")
    assert torch.allclose(got, want, atol=1e-5), f"x0-space loss {got} != implied-x0 MSE {want} (atol 1e-5)"


def test_velocity_and_x0_losses_differ_by_t_squared():
    x0, eps, v = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = add_noise(x0, eps, t)
    lv = prediction_loss_per_sample(v, x_t, x0, eps, t, "velocity")
    lx = prediction_loss_per_sample(v, x_t, x0, eps, t, "x0")
    assert torch.allclose(lx, lv * t**2, rtol=1e-4), f"x0 loss {lx} should be t^2 * velocity loss {lv * t**2}"


def test_dit_stage_lowers_the_loss(tmp_path):
    # Unshifted times: with the default shift most draws are near-pure noise, whose loss floor is high.
    cfg = _cfg(tmp_path, dit_steps=60, time_shift=1.0)
    train_dit(cfg, _model_cfg(), _bank(), Log(tmp_path))
    losses = _losses(tmp_path)
    assert losses[-1] < 0.6 * losses[0], f"DiT loss {losses[0]:.4f} -> {losses[-1]:.4f}: should fall by 40%"


def test_dit_stage_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg(tmp_path, dit_steps=20)
    straight, _, _ = train_dit(cfg, _model_cfg(), _bank(), Log(tmp_path))
    (tmp_path / "stage2-step000020.safetensors").unlink()  # as if killed after step 10's checkpoint
    resumed, _, _ = train_dit(cfg, _model_cfg(), _bank(), Log(tmp_path))
    assert len(_losses(tmp_path)) == 3, "the rerun must resume at step 10 (logs 10, 20, 20)"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), f"{name} differs after resuming (atol 1e-6)"


def test_head_mlp_waits_for_train_head_which_trains_it_alone(tmp_path):
    mc = dataclasses.replace(_model_cfg(), dit=dataclasses.replace(SMALL_DIT, head_hidden=32))
    cfg = _cfg(tmp_path, dit_steps=20, head_steps=60, head_lr=2e-3, time_shift=1.0)
    dit, t5, _ = train_dit(cfg, mc, _bank(), Log(tmp_path))
    assert dit.head.mlp[2].weight.abs().max() == 0, "train_dit must leave the head's MLP at its zero init"
    def weights():
        return {**{f"dit.{k}": v.clone() for k, v in dit.state_dict().items()},
                **{f"t5.{k}": v.clone() for k, v in t5.state_dict().items()}}

    before = weights()
    dit = train_head(cfg, dit, t5, _bank(), Log(tmp_path))
    after = weights()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("dit.head.mlp.") for k in changed), f"train_head changed {changed}"
    losses = _losses(tmp_path, "head")
    assert losses[-1] < 0.9 * losses[0], f"head loss {losses[0]:.4f} -> {losses[-1]:.4f}: should fall by 10%"


def test_a_joint_head_mlp_trains_with_the_dit_and_skips_train_head(tmp_path):
    mc = dataclasses.replace(_model_cfg(), dit=dataclasses.replace(SMALL_DIT, head_hidden=32))
    cfg = _cfg(tmp_path, dit_steps=20, head_steps=60, head_joint=True)
    dit, t5, _ = train_dit(cfg, mc, _bank(), Log(tmp_path))
    assert dit.head.mlp[2].weight.abs().max() > 0, "head_joint: train_dit must train the head's MLP"
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    dit = train_head(cfg, dit, t5, _bank(), Log(tmp_path))
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in before.items()), "train_head must skip"
    assert not list(tmp_path.glob("stage3-*")), "head_joint: no head-stage checkpoints"


def test_layout_share_draws_its_times_near_pure_noise(tmp_path):
    cfg = _cfg(tmp_path, layout_t=0.97)
    dit, t5 = DiT(SMALL_DIT), T5Encoder(model_config(cfg).t5)
    g = torch.Generator().manual_seed(0)
    _, _, t_all = dit_loss(cfg, dit, t5, _bank(), g, layout_share=1.0)
    _, _, t_none = dit_loss(cfg, dit, t5, _bank(), g)
    assert (t_all > 0.97).all() and (t_all < 1).all(), t_all
    assert (t_none <= 0.97).any(), "without a layout share the times come from the DiT stage's distribution"


def test_layout_stage_trains_dit_and_text_and_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg(tmp_path, dit_steps=10, layout_steps=20)
    mc = _model_cfg()

    def run():  # the DiT stage is done after the first call: later calls load its final checkpoint
        dit, t5, _ = train_dit(cfg, mc, _bank(), Log(tmp_path))
        before = {**dit.state_dict(), **{f"t5.{k}": v for k, v in t5.state_dict().items()}}
        before = {k: v.clone() for k, v in before.items()}
        dit, t5, _ = train_layout(cfg, dit, t5, _bank(), Log(tmp_path))
        after = {**dit.state_dict(), **{f"t5.{k}": v for k, v in t5.state_dict().items()}}
        return before, after

    before, straight = run()
    changed = {k.split(".")[0] for k in before if k in straight and not torch.equal(before[k], straight[k])}
    assert {"blocks", "t5"} <= changed, f"the layout stage must train the DiT and the T5, changed {changed}"
    rows = straight["t5.abs_pos"].abs().sum(-1)  # _bank's captions fill 3 positions
    assert "t5.abs_pos" not in before and (rows[:3] > 0).all() and (rows[3:] == 0).all(), rows
    (tmp_path / "stage4-step000020.safetensors").unlink()  # as if killed after step 10's checkpoint
    _, resumed = run()
    assert len(_losses(tmp_path, "layout")) == 3, "the rerun must resume at step 10 (logs 10, 20, 20)"
    for name, a in straight.items():
        assert torch.allclose(a, resumed[name], atol=1e-6), f"{name} differs after resuming (atol 1e-6)"


def test_head_mlp_resumes_to_the_same_weights(tmp_path):
    mc = dataclasses.replace(_model_cfg(), dit=dataclasses.replace(SMALL_DIT, head_hidden=32))
    cfg = _cfg(tmp_path, dit_steps=10, head_steps=20)

    def run():  # the DiT stage is done after the first call: later calls load its final checkpoint
        dit, t5, _ = train_dit(cfg, mc, _bank(), Log(tmp_path))
        return train_head(cfg, dit, t5, _bank(), Log(tmp_path)).head.mlp.state_dict()

    straight = run()
    (tmp_path / "stage3-step000020.safetensors").unlink()  # as if killed after step 10's checkpoint
    resumed = run()
    assert len(_losses(tmp_path, "head")) == 3, "the rerun must resume at step 10 (logs 10, 20, 20)"
    for name, a in straight.items():
        assert torch.allclose(a, resumed[name], atol=1e-6), f"head.mlp.{name} differs after resuming"


def test_a_head_mlp_leaves_the_dit_stage_unchanged(tmp_path):
    # Its init draws come last and its zero output adds exact zeros, so a base trained before the MLP
    # existed is what train_dit still trains.
    cfg = _cfg(tmp_path, dit_steps=10)
    mlp = dataclasses.replace(_model_cfg(), dit=dataclasses.replace(SMALL_DIT, head_hidden=32))
    with_mlp, t5a, _ = train_dit(cfg, mlp, _bank(), Log(tmp_path / "a"))
    cfg_b = _cfg(tmp_path / "b", dit_steps=10)
    without, t5b, _ = train_dit(cfg_b, _model_cfg(), _bank(), Log(tmp_path / "b"))
    a = {**with_mlp.state_dict(), **{f"t5.{k}": v for k, v in t5a.state_dict().items()}}
    b = {**without.state_dict(), **{f"t5.{k}": v for k, v in t5b.state_dict().items()}}
    assert set(a) - set(b) == {f"head.mlp.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert all(torch.equal(a[k], b[k]) for k in b), "the head MLP changed what train_dit trains"


def test_frozen_text_encoder_stays_at_its_init(tmp_path):
    cfg = _cfg(tmp_path, dit_steps=10, train_text=False)
    torch.manual_seed(cfg.seed + 1)
    _, t5, _ = train_dit(cfg, _model_cfg(), _bank(), Log(tmp_path))
    torch.manual_seed(cfg.seed + 1)
    DiT(SMALL_DIT)  # the same draws as train_dit, which builds the DiT first
    from model.t5 import T5Encoder

    fresh = T5Encoder(TINY.t5)
    assert all(torch.equal(a, b) for a, b in zip(t5.state_dict().values(), fresh.state_dict().values(),
                                                     strict=True)), "frozen T5 changed in training"


# The tiny-conv preset's VAE at a test width (4x8x8 unshuffle stem, KL posterior, adaptive decoder norm), with
# its linear skip path (SMALL_SKIP) and without it (SMALL_CONV: the convs alone).
SMALL_SKIP = dataclasses.replace(PRESETS["tiny-conv"], vae=dataclasses.replace(
    PRESETS["tiny-conv"].vae, base_channels=16, latent_channels=8),
    dit=dataclasses.replace(SMALL_DIT, in_channels=8, out_channels=8))
SMALL_CONV = dataclasses.replace(SMALL_SKIP, vae=dataclasses.replace(SMALL_SKIP.vae, linear_skip=False))


def test_conv_vae_stage_raises_heldout_psnr_and_logs_it(tmp_path):
    """The conv VAE stage logs a PSNR on the same whole held-out clips at each log step, and it rises."""
    cfg = _cfg(tmp_path, vae_steps=20, vae_full_steps=10, vae_batch=4, vae_full_batch=2, vae_lr=3e-3,
               vae_full_lr=3e-3, vae_heldout_clips=4, log_every=10, checkpoint_every=30)
    held = heldout_clips(cfg)
    assert held.shape == (4, 3, SMALL.frames, SMALL.size, SMALL.size)
    torch.manual_seed(cfg.seed)  # train_vae's own initialization
    before = heldout_psnr(VAE(SMALL_CONV.vae), held)
    vae = train_vae(cfg, SMALL_CONV, Log(tmp_path))
    after = heldout_psnr(vae, held)
    logged = [r["heldout_psnr"] for r in map(json.loads, open(tmp_path / "pretrain.jsonl"))
              if r["stage"] == "vae"]
    assert len(logged) == 3 and abs(logged[-1] - after) < 0.01, (logged, after)
    assert after > before + 1.5, f"held-out PSNR {before:.2f} -> {after:.2f} dB: should rise > 1.5 dB"


def test_linear_skip_vae_starts_at_the_pca_and_trains_past_it(tmp_path):
    """A linear_skip VAE's stage starts at the PCA of the same size (the held-out PSNR fit_linear_vae logged),
    and a short training lowers its loss and lifts its held-out PSNR above the PCA's."""
    kw = dict(vae_steps=0, vae_full_batch=4, vae_full_lr=1e-3, vae_lr=1e-3, vae_heldout_clips=8,
              vae_fit_clips=256, log_every=15, checkpoint_every=100)
    held = heldout_clips(_cfg(tmp_path, **kw))
    start = heldout_psnr(train_vae(_cfg(tmp_path, vae_full_steps=0, **kw), SMALL_SKIP, Log(tmp_path)), held)
    pca = [r for r in map(json.loads, open(tmp_path / "pretrain.jsonl")) if r.get("fit") == "pca"]
    assert len(pca) == 1 and abs(pca[0]["heldout_psnr"] - start) < 0.01, (pca, start)
    after = heldout_psnr(train_vae(_cfg(tmp_path, vae_full_steps=30, **kw), SMALL_SKIP, Log(tmp_path)), held)
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "pretrain.jsonl")) if "step" in r]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    assert after > start + 0.1, f"held-out PSNR {start:.2f} (PCA) -> {after:.2f} dB: should rise > 0.1 dB"


def test_vae_lr_covers_both_phases_and_ends_at_zero():
    """One cosine over crops + whole clips: warmup, then non-increasing, capped on whole clips, ~0 at the end
    (the old 1000-step horizon left the 900 crop steps at 2% of the peak and never used the rest)."""
    cfg = PretrainConfig(vae_steps=900, vae_full_steps=150, vae_lr=2e-3, vae_full_lr=5e-4)
    lrs = [vae_lr(cfg, s) for s in range(1050)]
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] < 1e-3 * 2e-3
    assert all(b <= a + 1e-12 for a, b in zip(lrs[50:], lrs[51:], strict=False))
    assert max(lrs[900:]) <= 5e-4


CONV_VAE = dataclasses.replace(TINY.vae, arch="conv", patch=(1, 1), latent_channels=8, base_channels=8,
                               channel_mult=(1, 2, 2), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1),
                               time_strides=(1, 2, 2), space_strides=(2, 2, 2), norm="rms")


@pytest.mark.parametrize("vae_cfg", [CONV_VAE, TINY.vae], ids=["conv", "linear"])
def test_latent_stats_normalize_latents_to_unit_scale(tmp_path, vae_cfg):
    """Conv VAE: unit std per channel. Linear VAE: one pooled std (unit mean variance), so latent
    distances stay proportional to pixel distances."""
    cfg = _cfg(tmp_path, stats_clips=16, vae_fit_clips=64)
    torch.manual_seed(0)
    vae = (VAE(vae_cfg) if vae_cfg.arch == "conv" else train_vae(cfg, TINY, Log(tmp_path))).eval()
    mean, std = latent_stats(cfg, vae)
    normed = VAE(dataclasses.replace(vae_cfg, latents_mean=mean, latents_std=std)).eval()
    normed.load_state_dict(vae.state_dict())
    z = normed.encode(to_model_video(generate_batch(16, seed=123, cfg=SMALL).video))
    per_channel = z.transpose(0, 1).flatten(1)
    assert (per_channel.mean(1).abs() / per_channel.std(1)).max() < 0.5, "roughly zero mean per channel"
    if vae_cfg.arch == "linear":
        assert len(set(std)) == 1 and abs(per_channel.var(1).mean().item() - 1) < 0.5
    else:
        assert (per_channel.std(1) - 1).abs().max() < 0.5, "unit std per channel on fresh clips"


def test_linear_vae_fit_is_the_pca_and_beats_any_other_rank_k_linear_code(tmp_path):
    """The fitted linear VAE reconstructs held-out clips better than a random rank-k projection, its
    latent channels are uncorrelated and ordered by variance, and a rerun loads the saved fit."""
    cfg = _cfg(tmp_path, vae_fit_clips=128)
    vae = train_vae(cfg, TINY, Log(tmp_path)).eval()
    clips = to_model_video(generate_batch(16, seed=99, split="heldout", cfg=SMALL).video)
    with torch.no_grad():
        err = (vae(clips)[0] - clips).square().mean()
        z = vae.encode_dist(clips)[0].transpose(0, 1).flatten(1)
        k = TINY.vae.latent_channels
        q = torch.linalg.qr(torch.randn(TINY.vae.patched_channels, k)).Q  # a random orthonormal rank-k code
        x = patchify(clips, TINY.vae.patch, first=True)
        mu = x.mean((0, 2, 3, 4), keepdim=True)
        proj = torch.einsum("bdthw,dk,ek->bethw", x - mu, q, q) + mu
        random_err = (unpatchify(proj, TINY.vae.patch, first=True) - clips).square().mean()
    assert err < random_err / 4, (err, random_err)
    var = z.var(1)
    assert var[:8].mean() > 20 * var[-8:].mean(), "the leading channels should carry the variance"
    corr = torch.corrcoef(z[:4])
    assert (corr - torch.eye(4)).abs().max() < 0.5, "the leading PCA channels should be nearly uncorrelated"
    again = train_vae(cfg, TINY, Log(tmp_path))
    pairs = zip(vae.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_tokenizer_covers_every_caption_with_whole_words(tmp_path):
    path = build_tokenizer(_cfg(tmp_path), Log(tmp_path))
    tok = Tokenizer(path)
    assert tok.vocab_size <= TINY.t5.vocab_size
    assert caption_length(tok, TINY.t5.max_length) <= TINY.t5.max_length
    assert all(tok.decode(tok.tokenize(c)) == c for c in all_captions()[:50]), "captions must round-trip"


def test_motion_quality_flags_a_jump_and_a_split():
    clip = generate_batch(1, seed=0, cfg=SMALL).video[0]  # (T, H, W, 3)
    ok = motion_quality([clip], [1])
    jumped = clip.copy()
    jumped[5:] = np.roll(clip[5:], 12, axis=2)  # teleport 12 px at frame 5
    split = clip.copy()
    split[:, 1:5, 1:5] = 255  # a second blob in the corner of every frame
    assert ok["smooth"] == 1.0 and ok["one_object"] == 1.0, ok
    assert motion_quality([jumped], [1])["smooth"] == 0.0
    assert motion_quality([split], [1])["one_object"] == 0.0


def test_report_markdown_and_contact_sheet_shapes():
    clip = generate_batch(2, seed=0, cfg=SMALL).video
    sheet = contact_sheet([clip[0], clip[1]], frames=(0, 4, 8), gap=2)
    assert sheet.shape == (2 * 34, 3 * 34, 3) and sheet.dtype == np.uint8
    attrs = ("background", "colour", "pair_colour", "shape", "motion")
    row = {a: {"accuracy": 0.5, "uniform": 0.2, "majority": 0.3, "n": 2} for a in attrs}
    row |= {"smooth": 1.0, "one_object": 1.0, "mean_max_jump_px": 1.5}
    md = report_markdown({"n": 2, "steps": 5, "vae_psnr_db": 31.0, "reference": row, "reconstruction": row,
                          "guidance": {"1.0": row, "3.0": row}})
    assert "guidance 3.0" in md and "31.00 dB" in md and "0.20 / 0.30" in md


@pytest.mark.slow
def test_pretrain_command_writes_a_loadable_checkpoint_and_report(tmp_path, monkeypatch):
    from setseq import cli, cmd_pretrain
    from weights.checkpoint import load_checkpoint

    small = _cfg(tmp_path / "work", dit_steps=6, bank_size=8)
    monkeypatch.setattr(cmd_pretrain, "config_from_args", lambda args: small)
    out = tmp_path / "out"
    assert cli.main(["pretrain", "--out", str(out), "--eval-samples", "4", "--eval-steps", "2",
                     "--guidance", "1", "3"]) == 0
    base = load_checkpoint(out, parts=("dit", "vae", "t5"))
    assert base.cfg.vae.latents_std is not None and base.tokenizer_path is not None
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["guidance"]) == {"1.0", "3.0"} and (out / "samples.png").is_file()


def test_colour_binding_script_reads_both_kinds_of_clip(monkeypatch, capsys):
    from benchmarks import colour_binding

    tiny = Path(__file__).resolve().parents[1] / "assets" / "tiny"
    argv = ["colour_binding", "--base", str(tiny), "--prompts", "6", "--world-seed", "3",
            "--two-object-prob", "0.5"]
    monkeypatch.setattr("sys.argv", argv)
    colour_binding.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| one", "| two"))]
    counts = [int(r.split("|")[2]) for r in rows]
    assert len(rows) == 2 and counts[0] + counts[1] // 2 == 6 and counts[1] > 0, rows  # objects of 6 prompts


def test_the_committed_base_reads_word_order():
    # The layout stage's point: near pure noise, swapping a two-object caption's objects must cost loss.
    from benchmarks.caption_order import order_losses, swapped_captions
    from weights.base import load_base

    pairs = generate_batch(3, seed=1, cfg=ToyWorldConfig(two_object_prob=1.0))
    for caption, swapped in zip(pairs.captions, swapped_captions(pairs.scenes), strict=True):
        (first, second), background = caption.split(" on a ")[0].split(" and "), caption.split(" on a ")[1]
        assert swapped == f"{second} and {first} on a {background}", (caption, swapped)
    base = load_base("tiny", device="cpu")
    [(_, right, swapped, hurt)] = order_losses(base, clips=4, seed=99, times=[1.0])
    assert swapped > 2 * right and hurt == 1.0, (right, swapped, hurt)


def test_a_preset_recipe_sets_defaults_that_flags_override():
    from setseq import cli, cmd_pretrain

    parser = cli.build_parser()
    conv = cmd_pretrain.config_from_args(parser.parse_args(["pretrain", "--preset", "tiny-conv"]))
    assert (conv.vae_steps, conv.vae_full_steps, conv.vae_full_batch, conv.vae_l1) == (0, 1000, 8, 0.0)
    flagged = cmd_pretrain.config_from_args(parser.parse_args(["pretrain", "--preset", "tiny-conv",
                                                               "--vae-full-steps", "7"]))
    assert flagged.vae_full_steps == 7 and flagged.vae_steps == 0
    linear = cmd_pretrain.config_from_args(parser.parse_args(["pretrain", "--preset", "tiny"]))
    assert linear == PretrainConfig(work_dir="runs/pretrain-tiny")  # the committed base's recipe unchanged
