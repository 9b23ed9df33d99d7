"""Pretraining the tiny base model on the toy world, end to end on a CPU: VAE, tokenizer + text
encoder, DiT. `main(cfg)` runs the stages in order; each is resumable from atomic checkpoints in
`cfg.work_dir` and a finished stage is skipped:

    1. VAE        a linear VAE (`tiny`) is fitted in closed form: the PCA of patchified toy clips, the
                  optimal linear autoencoder for MSE (seconds). A conv VAE trains on random crops of
                  fresh toy clips (9 frames, 32x32: 8x cheaper than whole clips), then whole 17x64x64
                  clips; MSE + L1 on pixels. Then the latent mean/std on toy clips go into
                  VAEConfig.latents_mean/std, so the DiT sees unit-scale latents (one pooled std for a
                  linear VAE, which keeps latent distances proportional to pixel distances).
    2. tokenizer  a sentencepiece model trained on every caption of the vocabulary (both splits: the
                  held-out split holds out combinations, never words).
    3. bank       `bank_size` training clips encoded once by the frozen VAE (encoding on the fly would
                  cost as much as a DiT step); captions as token ids.
    4. DiT        flow matching with the DiT's prediction space as loss (x0 for `tiny`), caption
                  dropout for guidance, self-conditioning, EMA; the T5 encoder frozen at its seeded
                  random init or trained jointly (`train_text`). The head's MLP (DiTConfig.head_hidden)
                  stays at its zero-output init here, unless `head_joint` trains it here instead of in 5.
    5. head MLP   the head's MLP alone, everything else frozen (`train_head`; checkpoints "stage3-*").
    6. layout     DiT + T5 further, the T5 with an absolute position, half of each batch at times in
                  (0.97, 1), where only the caption can say which object goes where (`train_layout`;
                  checkpoints "stage4-*").

The toy world is infinite and seeded: the VAE's step s draws clips with seed (cfg.seed, s), so a
resumed run sees the same data. `main` returns the trained parts (EMA weights for the DiT); the
command line (setseq/cmd_pretrain.py) saves them as a checkpoint folder and evaluates them.
Logs: `work_dir/pretrain.log` (readable) and `work_dir/pretrain.jsonl` (one record per log line).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.config import ModelConfig, get_preset
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
from model.tokenizer import Tokenizer, train_tokenizer
from model.vae import VAE, patchify
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    ToyWorldConfig,
    caption_of,
    generate_batch,
    to_model_video,
)
from train.checkpoint import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)

STAGE_VAE, STAGE_DIT, STAGE_HEAD, STAGE_LAYOUT = 1, 2, 3, 4
_EPS = 1e-4  # floor on a latent channel's std (a dead channel must not blow up when normalized)


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    work_dir: str = "runs/pretrain-tiny"
    seed: int = 0
    # torch CPU threads. 1 by default: on a shared 2-core machine a 2-thread job next to any other
    # process ran 10x slower (7 s vs 0.45 s a VAE step), a 1-thread job degrades gracefully.
    threads: int = 1
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    # -- VAE
    vae_steps: int = 900  # crop steps
    # Then whole 17-frame clips at a constant lr: a decoder trained on 3 latent frames alone got the
    # colours of latent frames 3-4 wrong.
    vae_full_steps: int = 150
    vae_full_lr: float = 5e-4
    vae_schedule_steps: int | None = 1000  # horizon of the VAE's cosine lr (None = its step count)
    vae_batch: int = 16
    vae_full_batch: int = 4
    vae_crop: tuple[int, int] = (9, 32)  # (frames, pixels) of a training crop
    vae_lr: float = 2e-3
    vae_l1: float = 0.5  # weight of the L1 term beside the MSE (sharper edges early)
    vae_fit_clips: int = 2048  # linear VAE: toy clips whose patch covariance gives the PCA
    stats_clips: int = 256  # clips for the latent mean/std
    # -- text
    tokenizer_vocab: int = 128  # soft limit; the captions hold 26 distinct words
    train_text: bool = True  # train the T5 jointly with the DiT; False = frozen seeded random encoder
    # -- DiT
    bank_size: int = 4096
    dit_steps: int = 24000  # 91 min on 2 threads; motion before the layout stage: 0.63 at 16k, 0.80 at 24k
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.998
    time_dist: str = "logit_normal"  # or "uniform"
    # Shift of the training times toward noise (model.flow.shift_time), as SD3/Wan do for large latents.
    # With 51k latent values per clip the layout is readable from x_t up to t ~ 0.9, and unshifted
    # logit-normal times almost never go past it (P(t > 0.9) = 1.4%): the 16k-step base trained so
    # never learned to lay out motion from the caption (motion at chance), while its x0 estimate at
    # t = 0.8 placed the object within 0.7 px. Shift 5 (the tiny preset's) puts 28% of the times above 0.9.
    time_shift: float | None = None  # None = the preset's sample_shift, so training and sampling agree
    # -- an MLP beside the head's Linear (DiTConfig.head_hidden; None = the preset's head), trained alone
    # after the DiT or with it (head_joint). The tiny head's Linear spans 128 of a token's 640 latent
    # values; 2% of a clip's energy (5% of a striped sprite's, most in moving latent frames) lies outside
    # that span. Both ways measured and not adopted: benchmarks/results/toyworld-base-experiments.md.
    head_hidden: int | None = None
    head_joint: bool = False  # True: the MLP trains with the DiT from step 0, and step 5 is skipped
    head_steps: int = 3000
    head_lr: float = 1e-3
    # -- layout: DiT + T5 trained further, with a learned absolute position added to the T5 and a share of
    # every batch at times in (layout_t, 1), where x_t no longer shows where the objects are and only the
    # caption can. Without it the base put a two-object caption's objects on random sides: it read the
    # layout from x_t and the caption as a bag of words (swapping the objects left its loss at t = 1
    # unchanged). Either half alone did not help in 2000 steps; both did (benchmarks/results/
    # toyworld-base-experiments.md, entry 3). 0 steps = no layout stage.
    layout_steps: int = 2000
    layout_share: float = 0.5
    layout_t: float = 0.97
    layout_lr: float = 1e-3
    self_cond_prob: float = 0.5  # paper: 0.9 in pretraining
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.world, dict):
            self.world = ToyWorldConfig(**self.world)
        if self.time_shift is None:
            self.time_shift = get_preset(self.preset).sample_shift
        self.vae_crop = tuple(self.vae_crop)
        frames, size = self.vae_crop
        if (frames - 1) % 4 or size % 8 or size > self.world.size or frames > self.world.frames:
            raise ValueError(f"vae_crop {self.vae_crop} must be (1 + 4k frames, a multiple of 8 px) within "
                             f"the world's {self.world.frames}x{self.world.size}")
        if not 0 <= self.self_cond_prob <= 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError(f"self_cond_prob {self.self_cond_prob} and caption_dropout "
                             f"{self.caption_dropout} must be probabilities (caption_dropout < 1)")


@dataclass
class Pretrained:
    """What `main` returns: the config that describes the weights, and the trained parts."""

    cfg: ModelConfig
    vae: VAE
    t5: T5Encoder
    dit: DiT  # the EMA weights
    tokenizer_path: Path
    metrics: dict


# ------------------------------------------------------------------------------------------ logging


class Log:
    """Readable lines in pretrain.log, the same records as JSON lines in pretrain.jsonl."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.text, self.json = folder / "pretrain.log", folder / "pretrain.jsonl"

    def __call__(self, stage: str, **values) -> None:
        record = {"time": time.strftime("%H:%M:%S"), "stage": stage, **values}
        with open(self.json, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
        with open(self.text, "a") as f:
            f.write(f"{record['time']} [{stage}] {' '.join(parts)}\n")


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: Tensor, lr: float, what: str,
                   hint: str) -> None:
    """Backward and a gradient-clipped step at learning rate `lr` (every loop of this file); a non-finite loss
    stops the run with `what` happened and `hint` (what to change) instead."""
    if not torch.isfinite(loss):
        raise ValueError(f"{what} became {loss.item()}; {hint} and resume")
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _clip_seed(seed: int, stage: int, step: int) -> int:
    return (seed * 1_000_003 + stage * 100_019 + step) % 2**63


# ------------------------------------------------------------------------------------------ 1. VAE


def vae_batch(cfg: PretrainConfig, step: int) -> Tensor:
    """The VAE's step-`step` batch: crops during the first vae_steps, whole clips after. (B, 3, T, H, W)."""
    full = step >= cfg.vae_steps
    n = cfg.vae_full_batch if full else cfg.vae_batch
    video = to_model_video(generate_batch(n, seed=_clip_seed(cfg.seed, STAGE_VAE, step), cfg=cfg.world).video)
    if full:
        return video
    frames, size = cfg.vae_crop
    rng = np.random.default_rng(_clip_seed(cfg.seed, STAGE_VAE + 10, step))
    t0 = int(rng.integers(0, cfg.world.frames - frames + 1))
    y0, x0 = (int(v) for v in rng.integers(0, cfg.world.size - size + 1, 2))
    return video[:, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size]


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
        seed = _clip_seed(cfg.seed, STAGE_VAE, i)
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
    held = generate_batch(64, seed=_clip_seed(cfg.seed, 11, 0), split="heldout", cfg=cfg.world)
    held = to_model_video(held.video)
    log("vae", fit="pca", clips=cfg.vae_fit_clips, variance_kept=round(kept, 5),
        heldout_psnr=round(psnr(vae(held)[0], held), 2), seconds=round(time.time() - t0, 1))
    tmp = path.with_suffix(".tmp")
    save_file({k_: v.contiguous() for k_, v in vae.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return vae


def train_vae(cfg: PretrainConfig, mc: ModelConfig, log: Log) -> VAE:
    """Stage 1; resumes from the newest stage-1 checkpoint and skips when the stage is done."""
    if mc.vae.arch == "linear":
        return fit_linear_vae(cfg, mc, log)
    torch.manual_seed(cfg.seed)
    vae = VAE(mc.vae)
    total = cfg.vae_steps + cfg.vae_full_steps
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    start = _resume(cfg, STAGE_VAE, {"vae": vae}, opt, g)
    if start >= total:
        return vae
    bar = tqdm(range(start, total), desc="VAE", initial=start, total=total)
    t0, window = time.time(), []
    for step in bar:
        x = vae_batch(cfg, step)
        crop = step < cfg.vae_steps
        lr = cosine_lr(step, cfg.vae_schedule_steps or total, 50, cfg.vae_lr) if crop else cfg.vae_full_lr
        rec, _, _ = vae(x)
        loss = F.mse_loss(rec, x) + cfg.vae_l1 * F.l1_loss(rec, x)
        hint = f"lower vae_lr (now {cfg.vae_lr})" if crop else f"lower vae_full_lr (now {cfg.vae_full_lr})"
        optimizer_step(opt, params, loss, lr, f"VAE loss at step {step}", hint)
        window.append(psnr(rec.detach(), x))
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{window[-1]:.1f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log("vae", step=step + 1, loss=loss.item(), psnr=float(np.mean(window)),
                crop=step < cfg.vae_steps, seconds=round(time.time() - t0, 1))
            window = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            _save(cfg, STAGE_VAE, step + 1, {"vae": vae}, opt, g)
    return vae


@torch.no_grad()
def latent_stats(cfg: PretrainConfig, vae: VAE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the raw latents of `stats_clips` toy clips (both splits' statistics
    are the world's; drawn from the training split). A linear VAE gets one pooled std for every channel:
    its channels are orthonormal directions in pixel space, so the DiT's latent MSE stays pixel MSE
    (per-channel scaling would weigh a faint edge-detail component like the object's colour)."""
    zs = []
    for i in range(0, cfg.stats_clips, 32):
        n, seed = min(32, cfg.stats_clips - i), _clip_seed(cfg.seed, 7, i)
        zs.append(vae.encode_dist(to_model_video(generate_batch(n, seed=seed, cfg=cfg.world).video))[0])
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, N)
    mean, std = z.mean(1), z.std(1).clamp_min(_EPS)
    if vae.cfg.arch == "linear":
        std = std.square().mean().sqrt().expand_as(std)
    return tuple(mean.tolist()), tuple(std.tolist())


# ------------------------------------------------------------------------------------ 2. tokenizer


def all_captions(two_objects: bool = True) -> list[str]:
    """Every caption the vocabulary can form (one object; pairs with distinct colours when asked)."""
    objs = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    out = [caption_of(bg, [o]) for bg in BACKGROUNDS for o in objs]
    if two_objects:
        rng = np.random.default_rng(0)  # a sample of pairs is enough to cover every word and join
        for _ in range(2000):
            a, b = (objs[i] for i in rng.integers(0, len(objs), 2))
            if a[0] != b[0]:
                out.append(caption_of(str(rng.choice(list(BACKGROUNDS))), [a, b]))
    return out


def build_tokenizer(cfg: PretrainConfig, log: Log) -> Path:
    path = Path(cfg.work_dir) / "tokenizer.model"
    if not path.is_file():
        # Each word also as a sentence of its own, repeated: on the captions alone (a few dozen words in
        # fixed patterns) the unigram trainer kept ~50 mostly single-letter pieces, 58 tokens a caption.
        captions = all_captions()
        words = sorted({w for c in captions for w in c.split()})
        train_tokenizer(captions + words * 50, path, vocab_size=cfg.tokenizer_vocab)
        log("tokenizer", pieces=Tokenizer(path).sp_size)
    return path


# ------------------------------------------------------------------------------------------ 3. bank


@dataclass
class Bank:
    latents: Tensor  # (N, C, T', H', W') normalized
    ids: Tensor  # (N, L) caption token ids
    mask: Tensor  # (N, L) bool
    empty_ids: Tensor  # (1, L) the empty prompt (caption dropout, the unconditional branch)
    empty_mask: Tensor  # (1, L)


def caption_length(tokenizer: Tokenizer, cap: int) -> int:
    """Token length covering every caption of the vocabulary (EOS included), at most `cap`."""
    longest = max(len(tokenizer.tokenize(c)) + 1 for c in all_captions())
    if longest > cap:
        raise ValueError(f"toy captions need {longest} tokens but the T5 takes {cap}; "
                         "raise T5Config.max_length")
    return longest


@torch.no_grad()
def build_bank(cfg: PretrainConfig, vae: VAE, tokenizer: Tokenizer, length: int, log: Log) -> Bank:
    path = Path(cfg.work_dir) / "bank.safetensors"
    if path.is_file():
        t = load_file(str(path))
    else:
        zs, caps, t0 = [], [], time.time()
        for i in tqdm(range(0, cfg.bank_size, 64), desc="latent bank"):
            batch = generate_batch(min(64, cfg.bank_size - i), seed=_clip_seed(cfg.seed, 3, i), cfg=cfg.world)
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


# -------------------------------------------------------------------------------------------- 4. DiT


def text_context(t5: T5Encoder, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return t5(ids, mask), mask


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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)


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
    start = _resume(cfg, STAGE_DIT, {"dit": dit, "ema": ema, "t5": t5}, opt, g)
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
            _save(cfg, STAGE_DIT, step + 1, {"dit": dit, "ema": ema, "t5": t5}, opt, g)
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
    start = _resume(cfg, stage, modules, opt, g)
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
            _save(cfg, stage, step + 1, modules, opt, g)
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


# ------------------------------------------------------------------------------------ checkpoints


def _save(cfg: PretrainConfig, stage: int, step: int, modules: dict[str, nn.Module], opt, g) -> None:
    params = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_checkpoint(checkpoint_path(cfg.work_dir, stage, step), stage=stage, step=step, params=params,
                    optimizer=opt, rng=capture_rng(g), config=asdict(cfg))
    prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints)


def _resume(cfg: PretrainConfig, stage: int, modules: dict[str, nn.Module], opt, g) -> int:
    """Load the newest checkpoint of `stage` (if any) into modules/opt/g; returns its step (0 if none)."""
    paths = [p for p in sorted(Path(cfg.work_dir).glob(f"stage{stage}-step*.safetensors"))]
    if not paths:
        return 0
    ck = load_checkpoint(paths[-1])
    for name, m in modules.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in ck.params.items() if k.startswith(prefix)},
                          strict=True)
    opt.load_state_dict(ck.optimizer)
    restore_rng(ck.rng, g)
    return ck.step


# ----------------------------------------------------------------------------------------------- main


def model_config(cfg: PretrainConfig) -> ModelConfig:
    """The preset with this run's architecture options applied (latent statistics come later)."""
    mc = get_preset(cfg.preset)
    if cfg.head_hidden is not None:
        mc = dataclasses.replace(mc, dit=dataclasses.replace(mc.dit, head_hidden=cfg.head_hidden))
    return mc


def main(cfg: PretrainConfig) -> Pretrained:
    # -- setup: threads, folder, log, the config the weights will carry
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormals in a converging VAE made CPU steps 10x slower
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work)
    log("setup", config=json.dumps(asdict(cfg)))
    mc = model_config(cfg)
    wall = time.time()

    # -- 1. VAE, then its latent statistics (they become config data)
    vae = train_vae(cfg, mc, log).eval()
    stats_path = work / "latent_stats.json"
    if not stats_path.is_file():
        mean, std = latent_stats(cfg, vae)
        stats_path.write_text(json.dumps({"mean": mean, "std": std}))
    stats = json.loads(stats_path.read_text())
    mc = dataclasses.replace(mc, vae=dataclasses.replace(mc.vae, latents_mean=tuple(stats["mean"]),
                                                         latents_std=tuple(stats["std"])))
    vae_state = vae.state_dict()
    vae = VAE(mc.vae).eval()
    vae.load_state_dict(vae_state, strict=True)

    # -- 2. tokenizer (sentencepiece on the captions); the T5 is built with the DiT below
    tok_path = build_tokenizer(cfg, log)
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > mc.t5.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but T5Config.vocab_size is "
                         f"{mc.t5.vocab_size}; lower tokenizer_vocab")
    length = caption_length(tokenizer, mc.t5.max_length)

    # -- 3. latent bank: training clips encoded once
    bank = build_bank(cfg, vae, tokenizer, length, log)

    # -- 4. DiT (+ text encoder)
    dit, t5, metrics = train_dit(cfg, mc, bank, log)

    # -- 5. the head's MLP, if the preset has one
    dit = train_head(cfg, dit, t5, bank, log)

    # -- 6. layout: more training where only the caption can place the objects
    dit, t5, layout_metrics = train_layout(cfg, dit, t5, bank, log)
    mc = dataclasses.replace(mc, t5=t5.cfg)  # the layout stage adds the T5's absolute position
    metrics = {**metrics, **{f"layout_{k}": v for k, v in layout_metrics.items()},
               "wall_seconds_this_run": round(time.time() - wall, 1)}
    log("done", **metrics)
    return Pretrained(mc, vae, t5, dit, tok_path, metrics)


def resume_step(work_dir: str | Path) -> tuple[int, int] | None:
    """(stage, step) of the newest checkpoint in work_dir, or None."""
    path = latest_checkpoint(work_dir)
    if path is None:
        return None
    ck = load_checkpoint(path)
    return ck.stage, ck.step


__all__ = ["PretrainConfig", "Pretrained", "main", "train_vae", "train_dit", "train_head", "train_layout",
           "dit_loss", "latent_stats", "build_tokenizer", "build_bank", "all_captions", "psnr", "cosine_lr"]
