"""What a run shows while it trains: the loss table (`LossLog`) and preview gifs of the first concept."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from model.base import Base
from model.flow import bin_labels, loss_by_t_bins

from .config import PersonalizeConfig
from .stage_data import StageData
from .step import StepOut
from .video import write_video


class LossLog:
    """A TSV a person can read: one row per `log_every` steps (and at each checkpoint, so a resumed run
    averages the same steps into each row), loss overall, concept and prior, gradient norm, and the
    concept loss per flow-time bin (which noise levels are learned).

    `until` (stage, step): where the run starts; rows after it, written by a run that was killed before
    its next checkpoint, are dropped so the resumed run does not write them twice."""

    def __init__(self, path: Path, bins: int, enabled: bool, until: tuple[int, int] = (0, 0)):
        self.path, self.bins, self.enabled = path, bins, enabled
        self.labels = bin_labels(bins)
        self._reset()
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            header = "\t".join(["stage", "step", "loss", "concept", "prior", "grad_norm", "seconds",
                                *self.labels])
            path.write_text("".join(f"{line}\n" for line in [header, *_rows_until(path, until)]))

    def _reset(self) -> None:
        self.n, self.loss, self.concept, self.prior, self.gnorm = 0, 0.0, [], [], 0.0
        self.bin_sum, self.bin_count = torch.zeros(self.bins), torch.zeros(self.bins)
        self.start = time.perf_counter()

    def add(self, out: StepOut, grad_norm: float) -> None:
        self.n += 1
        self.loss += float(out.loss.detach())
        self.gnorm += grad_norm
        prior = out.batch.is_prior.cpu()
        per, t = out.per_sample.cpu(), out.t.cpu()
        self.concept += per[~prior].tolist()
        self.prior += per[prior].tolist()
        mean, count = loss_by_t_bins(per[~prior], t[~prior], self.bins)
        self.bin_sum += torch.nan_to_num(mean) * count
        self.bin_count += count

    def flush(self, stage: int, step: int) -> dict:
        bins = (self.bin_sum / self.bin_count).tolist()
        row = {"stage": stage, "step": step, "loss": self.loss / max(self.n, 1),
               "concept": _mean(self.concept),
               "prior": _mean(self.prior), "grad_norm": self.gnorm / max(self.n, 1),
               "seconds": time.perf_counter() - self.start, **dict(zip(self.labels, bins, strict=True))}
        if self.enabled and self.n:
            cells = [str(stage), str(step)] + [f"{row[k]:.5g}" for k in list(row)[2:]]
            with open(self.path, "a") as f:
                f.write("\t".join(cells) + "\n")
        self._reset()
        return row


def _rows_until(path: Path, until: tuple[int, int]) -> list[str]:
    """The rows of an earlier loss table at or before (stage, step)."""
    if not path.is_file():
        return []
    rows = path.read_text().splitlines()[1:]
    return [r for r in rows if (cells := r.split("\t"))[1:] and (int(cells[0]), int(cells[1])) <= until]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def write_preview(path: Path, cfg: PersonalizeConfig, base: Base, data: StageData, stage: int,
                  sample_fn: Callable[..., Tensor], write: bool = True) -> None:
    """A short sample of the first concept with the current adapter, decoded to a gif (stage 1: one frame);
    write False: sample only (a rank other than 0 of a sharded run, whose DiT needs every rank)."""
    dit, device = base.dit, data.items.latents.device
    latent_shape = tuple(data.items.latents.shape[1:])
    text = cfg.concepts[0].text(cfg.text_stage(stage))
    rows = torch.tensor([data.prompts.index(text), data.empty], device=device)
    ctx = base.t5(data.prompts.ids[rows], data.prompts.mask[rows]).float()
    dit.eval()
    mask = data.prompts.mask[rows]
    z = sample_fn(dit, (1, *latent_shape), (ctx[:1], mask[:1]), (ctx[1:], mask[1:]), steps=cfg.preview_steps,
                  guidance=base.config.guidance, shift=cfg.train_shift(base.config.sample_shift),
                  generator=torch.Generator(device).manual_seed(cfg.seed))
    dit.train()
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, base.vae.decode(z.to(next(base.vae.parameters()).dtype), chunk="auto")[0],
                fps=cfg.fps or 8.0)
