"""Pretraining stage 1, the tiny base's VAE: a linear VAE fitted in closed form (the PCA of patchified toy
clips) or a conv VAE trained on crops then whole clips; then its latent statistics."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from model.config import ModelConfig
from model.vae import VAE, init_linear_skip, kl_loss, patchify
from toyworld.pretrain_loop import (
    STAGE_VAE,
    Log,
    clip_seed,
    cosine_lr,
    optimizer_step,
    resume_stage,
    save_stage,
)
from toyworld.world import generate_batch, to_model_video

if TYPE_CHECKING:
    from toyworld.pretrain import PretrainConfig

_EPS = 1e-4  # floor on a latent channel's std (a dead channel must not blow up when normalized)


def vae_batch(cfg: PretrainConfig, step: int) -> Tensor:
    """The VAE's step-`step` batch: crops during the first vae_steps, whole clips after. (B, 3, T, H, W)."""
    full = step >= cfg.vae_steps
    n = cfg.vae_full_batch if full else cfg.vae_batch
    video = to_model_video(generate_batch(n, seed=clip_seed(cfg.seed, STAGE_VAE, step), cfg=cfg.world).video)
    if full:
        return video
    frames, size = cfg.vae_crop
    rng = np.random.default_rng(clip_seed(cfg.seed, STAGE_VAE + 10, step))
    t0 = int(rng.integers(0, cfg.world.frames - frames + 1))
    y0, x0 = (int(v) for v in rng.integers(0, cfg.world.size - size + 1, 2))
    return video[:, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size]


def heldout_clips(cfg: PretrainConfig) -> Tensor:
    """The fixed held-out batch of the VAE stage: `vae_heldout_clips` whole held-out clips (B, 3, T, H, W)."""
    seed = clip_seed(cfg.seed, 11, 0)
    held = generate_batch(cfg.vae_heldout_clips, seed=seed, split="heldout", cfg=cfg.world)
    return to_model_video(held.video)


@torch.no_grad()
def heldout_psnr(vae: VAE, held: Tensor, batch: int = 8) -> float:
    """PSNR of the posterior-mean reconstruction of whole held-out clips (`batch` at a time)."""
    mse = 0.0
    for x in held.split(batch):
        rec = vae(x, sample=False)[0]
        mse += ((rec.clamp(-1, 1) - x) / 2).pow(2).sum().item()
    return 10 * math.log10(1 / max(mse / held.numel(), 1e-12))


def psnr(rec: Tensor, video: Tensor) -> float:
    """PSNR in dB of [-1, 1] videos, on the [0, 1] scale (peak 1)."""
    mse = ((rec.clamp(-1, 1) - video) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def fit_linear_vae(cfg: PretrainConfig, mc: ModelConfig, log: Log) -> VAE:
    """A linear VAE set to the PCA of patchified toy clips (saved in work_dir; a rerun loads it).

    Encoder rows are the top `latent_channels` eigenvectors of the patch covariance (sign fixed so each
    vector's largest entry is positive), the decoder their transpose; biases centre on the patch mean.
    """
    vae = VAE(mc.vae)
    path = Path(cfg.work_dir) / "vae-linear.safetensors"
    if path.is_file():
        vae.load_state_dict(load_file(str(path)), strict=True)
        return vae
    t0, k, n = time.time(), mc.vae.latent_channels, 0
    total, outer = 0.0, 0.0
    for i in tqdm(range(0, cfg.vae_fit_clips, 64), desc="VAE (PCA)"):
        seed = clip_seed(cfg.seed, STAGE_VAE, i)
        video = to_model_video(generate_batch(min(64, cfg.vae_fit_clips - i), seed=seed, cfg=cfg.world).video)
        x = patchify(video, mc.vae.patch, first=True).transpose(0, 1).flatten(1).double()  # (D, N)
        total, outer, n = total + x.sum(1), outer + x @ x.T, n + x.shape[1]
    mean = total / n
    evals, evecs = torch.linalg.eigh(outer / n - torch.outer(mean, mean))  # ascending
    basis = evecs[:, -k:].flip(1).T  # (k, D), largest variance first
    basis *= torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    eye = torch.eye(k).view(k, k, 1, 1, 1)
    vae.encoder.proj.weight.copy_(basis.float().view(k, -1, 1, 1, 1))
    vae.encoder.proj.bias.copy_(-(basis @ mean).float())
    vae.decoder.proj.weight.copy_(basis.T.float().reshape(-1, k, 1, 1, 1))
    vae.decoder.proj.bias.copy_(mean.float())
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight.copy_(eye)
        conv.bias.zero_()
    kept = float(evals[-k:].sum() / evals.sum())
    held = heldout_clips(cfg)
    log("vae", fit="pca", clips=cfg.vae_fit_clips, variance_kept=round(kept, 5),
        heldout_psnr=round(psnr(vae(held)[0], held), 2), seconds=round(time.time() - t0, 1))
    tmp = path.with_suffix(".tmp")
    save_file({k_: v.contiguous() for k_, v in vae.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return vae


def linear_model(mc: ModelConfig) -> ModelConfig:
    """`mc` with its VAE replaced by the linear VAE of its compression and latent size (its skip path)."""
    one, v = (1,), mc.vae
    vae = dataclasses.replace(v, arch="linear", kl=False, linear_skip=False, patch=(v.time_compression,
                              v.space_compression), channel_mult=one, encoder_blocks=one, decoder_blocks=one,
                              time_strides=one, space_strides=one, residual=False, decoder_base_channels=None)
    return dataclasses.replace(mc, vae=vae)


def vae_lr(cfg: PretrainConfig, step: int) -> float:
    """One cosine over the whole stage (crops, then whole clips; warmup 50), capped at vae_full_lr on whole
    clips (their batch is smaller). Its horizon is the stage's length, so it ends at 0 with the last step."""
    total = cfg.vae_steps + cfg.vae_full_steps
    lr = cosine_lr(step, total, min(50, total // 10), cfg.vae_lr)
    return lr if step < cfg.vae_steps else min(lr, cfg.vae_full_lr)


def train_vae(cfg: PretrainConfig, mc: ModelConfig, log: Log) -> VAE:
    """Stage 1; resumes from the newest stage-1 checkpoint and skips when the stage is done. Each log step
    records the training PSNR (on that window's crops or clips) and the PSNR on a fixed held-out batch of
    whole clips (`heldout_psnr`, the number to compare with the PCA's)."""
    if mc.vae.arch == "linear":
        return fit_linear_vae(cfg, mc, log)
    torch.manual_seed(cfg.seed)
    vae = VAE(mc.vae)
    total = cfg.vae_steps + cfg.vae_full_steps
    if mc.vae.linear_skip:  # start at the PCA of the same patches and latent size (a resume overwrites it)
        init_linear_skip(vae, fit_linear_vae(cfg, linear_model(mc), log))
        # The skip path stays the PCA (trained at the convs' lr it fell below the PCA: 26.8 against 27.8 dB
        # held-out at step 100; benchmarks/results/toyworld-base-experiments.md, 5).
        vae.skip_encoder.requires_grad_(False)
        vae.skip_decoder.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    start = resume_stage(cfg, STAGE_VAE, {"vae": vae}, opt, g)
    if start >= total:
        return vae
    held = heldout_clips(cfg)
    bar = tqdm(range(start, total), desc="VAE", initial=start, total=total)
    t0, window = time.time(), []
    for step in bar:
        x = vae_batch(cfg, step)
        crop = step < cfg.vae_steps
        # Without a KL term the posterior's noise only blurs the code (at init its std is ~1, above the
        # mean's): train on the mean then.
        rec, mean, logvar = vae(x, sample=cfg.vae_kl > 0, generator=g)
        loss = F.mse_loss(rec, x) + cfg.vae_l1 * F.l1_loss(rec, x)
        if logvar is not None and cfg.vae_kl:
            loss = loss + cfg.vae_kl * kl_loss(mean, logvar)
        hint = f"lower vae_lr (now {cfg.vae_lr})" if crop else f"lower vae_full_lr (now {cfg.vae_full_lr})"
        optimizer_step(opt, params, loss, vae_lr(cfg, step), f"VAE loss at step {step}", hint)
        window.append(psnr(rec.detach(), x))
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{window[-1]:.1f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log("vae", step=step + 1, loss=loss.item(), psnr=float(np.mean(window)),
                heldout_psnr=round(heldout_psnr(vae, held), 2), crop=crop, lr=vae_lr(cfg, step),
                seconds=round(time.time() - t0, 1))
            window = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            save_stage(cfg, STAGE_VAE, step + 1, {"vae": vae}, opt, g)
    return vae


@torch.no_grad()
def latent_stats(cfg: PretrainConfig, vae: VAE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the raw latents of `stats_clips` toy clips (both splits' statistics
    are the world's; drawn from the training split). A linear VAE gets one pooled std for every channel:
    its channels are orthonormal directions in pixel space, so the DiT's latent MSE stays pixel MSE
    (per-channel scaling would weigh a faint edge-detail component like the object's colour)."""
    zs = []
    for i in range(0, cfg.stats_clips, 32):
        n, seed = min(32, cfg.stats_clips - i), clip_seed(cfg.seed, 7, i)
        zs.append(vae.encode_dist(to_model_video(generate_batch(n, seed=seed, cfg=cfg.world).video))[0])
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, N)
    mean, std = z.mean(1), z.std(1).clamp_min(_EPS)
    if vae.cfg.arch == "linear":
        std = std.square().mean().sqrt().expand_as(std)
    return tuple(mean.tolist()), tuple(std.tolist())


__all__ = ["vae_batch", "vae_lr", "heldout_clips", "heldout_psnr", "psnr", "fit_linear_vae", "train_vae",
           "latent_stats"]
