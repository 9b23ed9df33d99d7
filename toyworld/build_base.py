"""What `setseq pretrain` makes: the tiny base trained on the toy world, saved as a checkpoint folder
with its training record and log, and measured on held-out captions.

    OUT/config.json, dit/vae/text_encoder.safetensors, tokenizer.model    the base (`--base OUT`)
    OUT/pretrain.json, pretrain.log                                      how it was trained
    OUT/metrics.json, report.md, samples.png                             the held-out evaluation
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toyworld.evaluate import heldout_report, write_report
from toyworld.pretrain import PretrainConfig, Pretrained, main
from weights.checkpoint import save_checkpoint


@dataclass(frozen=True)
class Evaluation:
    """The held-out evaluation after pretraining (samples 0 = none)."""

    samples: int = 64
    steps: int = 25
    guidance: tuple[float, ...] = (1.0, 3.0, 5.0)


def build_base(cfg: PretrainConfig, out: Path, evaluation: Evaluation) -> dict | None:
    """Pretrain (resuming from cfg.work_dir), save the base to OUT, evaluate it; returns the held-out
    report, or None when evaluation.samples is 0."""
    t0 = time.time()
    result = main(cfg)
    save(out, cfg, result, time.time() - t0)
    if evaluation.samples <= 0:
        return None
    with torch.no_grad():
        return evaluate(out, result, cfg, evaluation)


def save(out: Path, cfg: PretrainConfig, result: Pretrained, train_seconds: float) -> None:
    save_checkpoint(out, result.cfg, dit=result.dit, vae=result.vae, t5=result.t5,
                    tokenizer_path=result.tokenizer_path,
                    source={"command": "setseq pretrain", "preset": cfg.preset, "seed": cfg.seed})
    record = {"config": dataclasses.asdict(cfg), "train_metrics": result.metrics,
              "wall_seconds_this_invocation": round(train_seconds, 1), "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copyfile(Path(cfg.work_dir) / "pretrain.log", out / "pretrain.log")  # every stage's progress


def evaluate(out: Path, result: Pretrained, cfg: PretrainConfig, evaluation: Evaluation) -> dict:
    """Held-out captions of the toy world -> metrics.json, report.md, samples.png in `out`."""
    report, videos, batch = heldout_report(result, cfg.world, cfg.seed + 12345, cfg.seed, evaluation.samples,
                                           evaluation.steps, list(evaluation.guidance))
    write_report(out, report, videos, batch.video, batch.captions)
    return report
