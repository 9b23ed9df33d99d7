"""The pieces every pretraining stage's loop shares (toyworld/pretrain.py runs the stages): the log, the
learning-rate schedule, a checked optimizer step, the EMA, seeds for the world's clips, and the per-stage
checkpoints a stage resumes from."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from train.checkpoint import (
    capture_rng,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)

if TYPE_CHECKING:
    from toyworld.pretrain import PretrainConfig

STAGE_VAE, STAGE_DIT, STAGE_HEAD, STAGE_LAYOUT = 1, 2, 3, 4


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


def clip_seed(seed: int, stage: int, step: int) -> int:
    return (seed * 1_000_003 + stage * 100_019 + step) % 2**63


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)


def save_stage(cfg: PretrainConfig, stage: int, step: int, modules: dict[str, nn.Module], opt, g) -> None:
    params = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_checkpoint(checkpoint_path(cfg.work_dir, stage, step), stage=stage, step=step, params=params,
                    optimizer=opt, rng=capture_rng(g), config=asdict(cfg))
    prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints)


def resume_stage(cfg: PretrainConfig, stage: int, modules: dict[str, nn.Module], opt, g) -> int:
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


__all__ = ["STAGE_VAE", "STAGE_DIT", "STAGE_HEAD", "STAGE_LAYOUT", "Log", "cosine_lr", "optimizer_step",
           "clip_seed", "ema_update", "save_stage", "resume_stage"]
