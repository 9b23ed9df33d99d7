"""Pretraining the tiny base's DiT on the toy world (stages 3-6 of toyworld/pretrain.py): the latent bank,
the flow-matching loss, the DiT (+ T5) stage, then the head-MLP and layout fine-tunes."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.config import ModelConfig
from model.dit import DiT
from model.flow import (
    T_MIN,
    add_noise,
    loss_by_t_bins,
    prediction_loss_per_sample,
    sample_time,
    x0_from_velocity,
)
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer
from model.vae import VAE
from toyworld.pretrain_loop import (
    STAGE_DIT,
    STAGE_HEAD,
    STAGE_LAYOUT,
    Log,
    clip_seed,
    cosine_lr,
    ema_update,
    optimizer_step,
    resume_stage,
    save_stage,
)
from toyworld.world import generate_batch, to_model_video

if TYPE_CHECKING:
    from toyworld.pretrain import PretrainConfig


@dataclass
class Bank:
    latents: Tensor  # (N, C, T', H', W') normalized
    ids: Tensor  # (N, L) caption token ids
    mask: Tensor  # (N, L) bool
    empty_ids: Tensor  # (1, L) the empty prompt (caption dropout, the unconditional branch)
    empty_mask: Tensor  # (1, L)


@torch.no_grad()
def build_bank(cfg: PretrainConfig, vae: VAE, tokenizer: Tokenizer, length: int, log: Log) -> Bank:
    path = Path(cfg.work_dir) / "bank.safetensors"
    if path.is_file():
        t = load_file(str(path))
    else:
        zs, caps, t0 = [], [], time.time()
        for i in tqdm(range(0, cfg.bank_size, 64), desc="latent bank"):
            batch = generate_batch(min(64, cfg.bank_size - i), seed=clip_seed(cfg.seed, 3, i), cfg=cfg.world)
            zs.append(vae.encode(to_model_video(batch.video)))
            caps += batch.captions
        ids, mask = tokenizer.encode(caps, length)
        empty_ids, empty_mask = tokenizer.encode([""], length)
        t = {"latents": torch.cat(zs).contiguous(), "ids": ids, "mask": mask, "empty_ids": empty_ids,
             "empty_mask": empty_mask}
        save_file(t, str(path))
        log("bank", clips=cfg.bank_size, seconds=round(time.time() - t0, 1),
            latent_std=float(t["latents"].std()))
    return Bank(t["latents"], t["ids"], t["mask"].bool(), t["empty_ids"], t["empty_mask"].bool())


def dit_loss(cfg: PretrainConfig, dit: DiT, t5: T5Encoder, bank: Bank, g: torch.Generator,
             layout_share: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One flow-matching loss on a random bank batch: (scalar loss, per-sample (B,), t (B,)); a share
    `layout_share` of the batch takes times in (cfg.layout_t, 1) instead (the layout stage)."""
    b = cfg.batch
    idx = torch.randint(0, len(bank.latents), (b,), generator=g)
    x0, ids, mask = bank.latents[idx], bank.ids[idx].clone(), bank.mask[idx].clone()
    drop = torch.rand(b, generator=g) < cfg.caption_dropout  # empty prompt: the unconditional model
    ids[drop], mask[drop] = bank.empty_ids, bank.empty_mask
    context = t5(ids, mask)  # (B, L, D); no grad flows when the T5 is frozen
    t = sample_time(b, kind=cfg.time_dist, shift=cfg.time_shift, generator=g)
    if layout_share > 0:
        high = cfg.layout_t + (1 - cfg.layout_t) * torch.rand(b, generator=g)
        t = torch.where(torch.rand(b, generator=g) < layout_share, high, t).clamp(max=1 - T_MIN)
    eps = torch.randn(x0.shape, generator=g)
    x_t = add_noise(x0, eps, t)
    self_cond = None
    if dit.cfg.self_cond and cfg.self_cond_prob > 0:
        use = torch.rand(b, generator=g) < cfg.self_cond_prob
        if bool(use.any()):
            with torch.no_grad():  # the model's own x0 estimate, fed back as input
                v0 = dit(x_t, t, context.detach(), context_mask=mask)
            self_cond = x0_from_velocity(x_t, v0, t) * use.view(-1, 1, 1, 1, 1)
    v = dit(x_t, t, context, context_mask=mask, self_cond=self_cond)
    per_sample = prediction_loss_per_sample(v, x_t, x0, eps, t, dit.cfg.prediction)
    return per_sample.mean(), per_sample.detach(), t


def train_dit(cfg: PretrainConfig, mc: ModelConfig, bank: Bank, log: Log) -> tuple[DiT, T5Encoder, dict]:
    """Stage 2: the DiT (and the T5 when train_text); returns (EMA DiT, T5, last metrics)."""
    torch.manual_seed(cfg.seed + 1)
    dit, t5 = DiT(mc.dit), T5Encoder(mc.t5)
    ema = copy.deepcopy(dit).requires_grad_(False)
    t5.requires_grad_(cfg.train_text)
    head_mlp = getattr(dit.head, "mlp", None)
    if head_mlp is not None and not cfg.head_joint:
        head_mlp.requires_grad_(False)  # train_head trains it, on the finished model
    params = list(dit.parameters()) + (list(t5.parameters()) if cfg.train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    start = resume_stage(cfg, STAGE_DIT, {"dit": dit, "ema": ema, "t5": t5}, opt, g)
    metrics: dict = {}
    if start >= cfg.dit_steps:
        return ema.eval(), t5.eval(), metrics
    bar = tqdm(range(start, cfg.dit_steps), desc="DiT", initial=start, total=cfg.dit_steps)
    t0, losses, bins, counts = time.time(), [], torch.zeros(4), torch.zeros(4)
    for step in bar:
        loss, per_sample, t = dit_loss(cfg, dit, t5, bank, g)
        optimizer_step(opt, params, loss, cosine_lr(step, cfg.dit_steps, cfg.warmup, cfg.lr),
                       f"DiT loss at step {step}", f"lower lr (now {cfg.lr})")
        ema_update(ema, dit, min(cfg.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        mean, count = loss_by_t_bins(per_sample, t, 4)
        bins += torch.nan_to_num(mean) * count
        counts += count
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.dit_steps:
            by_t = (bins / counts.clamp_min(1)).tolist()
            metrics = {"step": step + 1, "loss": float(np.mean(losses)),
                       **{f"loss_t{i}": round(v, 5) for i, v in enumerate(by_t)},
                       "seconds": round(time.time() - t0, 1)}
            log("dit", **metrics)
            losses, bins, counts = [], torch.zeros(4), torch.zeros(4)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.dit_steps:
            save_stage(cfg, STAGE_DIT, step + 1, {"dit": dit, "ema": ema, "t5": t5}, opt, g)
    return ema.eval(), t5.eval(), metrics


def finetune(cfg: PretrainConfig, stage: int, name: str, label: str, dit: DiT, t5: T5Encoder, bank: Bank,
             log: Log, *,
             params: list[nn.Parameter], model: nn.Module, ema: nn.Module, modules: dict[str, nn.Module],
             steps: int, lr: float, lr_name: str, seed: int, layout_share: float = 0.0) -> dict:
    """The loop of the stages after the DiT's (head MLP, layout): AdamW on `params` with a cosine schedule
    from `lr`, `ema` following `model`, logs as `name`, checkpoints `modules` as `stage` and resumes from
    them (`label` names it on the progress bar and in errors); returns the last logged metrics."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    start = resume_stage(cfg, stage, modules, opt, g)
    t0, losses, metrics = time.time(), [], {}
    for step in tqdm(range(start, steps), desc=label, initial=start, total=steps):
        loss, _, _ = dit_loss(cfg, dit, t5, bank, g, layout_share=layout_share)
        optimizer_step(opt, params, loss, cosine_lr(step, steps, cfg.warmup, lr),
                       f"{label} loss at step {step}", f"lower {lr_name} (now {lr})")
        ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            metrics = {"step": step + 1, "loss": float(np.mean(losses)),
                       "seconds": round(time.time() - t0, 1)}
            log(name, **metrics)
            losses = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            save_stage(cfg, stage, step + 1, modules, opt, g)
    return metrics


def train_head(cfg: PretrainConfig, dit: DiT, t5: T5Encoder, bank: Bank, log: Log) -> DiT:
    """Step 5: the head's MLP alone, everything else frozen; returns `dit` with the MLP's EMA weights."""
    mlp = getattr(dit.head, "mlp", None)
    if mlp is None or cfg.head_joint or cfg.head_steps == 0:
        return dit
    dit.requires_grad_(False)
    t5.requires_grad_(False)
    mlp.requires_grad_(True)
    ema = copy.deepcopy(mlp).requires_grad_(False)
    finetune(cfg, STAGE_HEAD, "head", "head MLP", dit, t5, bank, log, params=list(mlp.parameters()),
             model=mlp, ema=ema, modules={"mlp": mlp, "ema": ema}, steps=cfg.head_steps, lr=cfg.head_lr,
             lr_name="head_lr", seed=cfg.seed + 3)
    mlp.load_state_dict(ema.state_dict())
    return dit.requires_grad_(False).eval()


def with_abs_pos(t5: T5Encoder, seed: int, length: int) -> T5Encoder:
    """A copy of `t5` with T5Config.abs_pos, its first `length` rows (the positions training captions
    fill) drawn N(0, 1) like the token embeddings, so that positions are in the DiT's cross-attention keys
    from the first step; later rows stay zero (never trained: a longer prompt's tail gets no position)."""
    out = T5Encoder(dataclasses.replace(t5.cfg, abs_pos=True))
    missing = out.load_state_dict(t5.state_dict(), strict=False).missing_keys
    assert missing == ["abs_pos"], missing
    with torch.no_grad():
        draw = torch.randn(out.abs_pos.shape, generator=torch.Generator().manual_seed(seed))
        out.abs_pos.copy_(draw)
        out.abs_pos[length:] = 0
    return out


def train_layout(cfg: PretrainConfig, dit: DiT, t5: T5Encoder, bank: Bank, log: Log
                 ) -> tuple[DiT, T5Encoder, dict]:
    """Stage 6: the finished DiT and T5 trained further, the T5 with an absolute position, `layout_share`
    of each batch at times in (layout_t, 1) (checkpoints "stage4-*"); returns the EMA DiT, the T5 and the
    last logged metrics. No-op if layout_steps is 0."""
    if cfg.layout_steps == 0:
        return dit, t5, {}
    if t5.abs_pos is None:
        t5 = with_abs_pos(t5, seed=cfg.seed + 4, length=bank.ids.shape[1])
    dit.requires_grad_(True).train()
    t5.requires_grad_(cfg.train_text).train()
    ema = copy.deepcopy(dit).requires_grad_(False)
    params = list(dit.parameters()) + (list(t5.parameters()) if cfg.train_text else [])
    metrics = finetune(cfg, STAGE_LAYOUT, "layout", "layout", dit, t5, bank, log, params=params, model=dit,
                       ema=ema, modules={"dit": dit, "ema": ema, "t5": t5}, steps=cfg.layout_steps,
                       lr=cfg.layout_lr, lr_name="layout_lr", seed=cfg.seed + 4,
                       layout_share=cfg.layout_share)
    return ema.eval(), t5.requires_grad_(False).eval(), metrics


__all__ = ["Bank", "build_bank", "dit_loss", "train_dit", "finetune", "train_head", "with_abs_pos",
           "train_layout"]
