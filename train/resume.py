"""What makes a resumed run equal an uninterrupted one: the seeds, the learned state (adapter + token
embeddings), and the choice and check of the checkpoint a run continues (train/checkpoint.py holds
the file format).

Every random draw of the loop comes from one generator plus torch's global RNG (the LoRA dropout
masks); a checkpoint holds both, with the optimizer and the config that wrote it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from lora.inject import concept_state_dict, load_concept_state_dict
from lora.tokens import AddedTokens
from model.tempfiles import remove_stale

from .checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from .checkpoint_dcp import dcp_checkpoint_path
from .config import RESUME_FREE, PersonalizeConfig, require


def seed_everything(seed: int, g: torch.Generator) -> None:
    torch.manual_seed(seed)
    g.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------ learned state


def adapter_state(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens) -> dict[str, Tensor]:
    """Everything the run has learned: the adapter's A1, B1, B2 and the token embeddings."""
    state = {f"lora.{k}": v for k, v in concept_state_dict(dit, cfg.name).items()}
    state.update({f"token.{k}": v for k, v in tokens.state().items()})
    return state


def load_adapter_state(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens,
                       state: dict[str, Tensor]) -> None:
    load_concept_state_dict(dit, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, cfg.name)
    tokens.load({k[6:]: v for k, v in state.items() if k.startswith("token.")})


# ------------------------------------------------------------------------------------- one stage


def start_stage(cfg: PersonalizeConfig, stage: int, optimizer: torch.optim.Optimizer, g: torch.Generator,
                resume: Checkpoint | None) -> int:
    """The step a stage starts at: the checkpoint's, with its optimizer and random state restored;
    else 0, with the draws seeded from the stage's own seed."""
    if resume is None:
        seed_everything(cfg.stage_seed(stage), g)
        return 0
    rates = [group["lr"] for group in optimizer.param_groups]  # this run's, which a resume may change
    optimizer.load_state_dict(resume.optimizer)
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    restore_rng(resume.rng, g)
    return resume.step


def save_stage_checkpoint(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens,
                          optimizer: torch.optim.Optimizer, g: torch.Generator, stage: int, step: int
                          ) -> None:
    """Checkpoint after `step` steps of `stage`, keeping the newest `keep_checkpoints`."""
    folder = cfg.work / "checkpoints"
    save_checkpoint(checkpoint_path(folder, stage, step), stage=stage, step=step,
                    params=adapter_state(cfg, dit, tokens), optimizer=optimizer, rng=capture_rng(g),
                    config=cfg.to_dict())
    prune_checkpoints(folder, cfg.keep_checkpoints)


# ------------------------------------------------------------------------------- which checkpoint


def resume_point(cfg: PersonalizeConfig) -> Checkpoint | None:
    """The checkpoint to start from, or None for a fresh run.

    --resume: the latest checkpoint, if any. `--stage 2` alone: the final stage-1 checkpoint of the
    same work dir (from an earlier `--stage 1` run). Otherwise existing checkpoints are an error,
    so a new run never mixes with an old one.
    """
    remove_stale(cfg.work / "checkpoints")  # temporaries of killed runs (model/tempfiles.py)
    remove_stale(Path(cfg.out).parent, Path(cfg.out).name)
    ckpt = _start_checkpoint(cfg)
    if ckpt is None:
        return None
    if cfg.stages == (2,):
        require(ckpt.stage == 2 or ckpt.step >= cfg.steps1,
                f"stage 2 needs a finished stage 1, but the latest checkpoint {ckpt.path} is stage 1 step "
                f"{ckpt.step} of {cfg.steps1}; finish it with --stage 1 --resume")
    _check_resume_config(cfg, ckpt.config, ckpt.stage, ckpt.path)
    _record_changes(cfg, ckpt)
    return ckpt


def fresh_resume_note(cfg: PersonalizeConfig) -> str | None:
    """--resume with no checkpoint yet (a run killed before its first one) starts at step 0: what to say."""
    folder = cfg.work / "checkpoints"
    if cfg.resume and not list_checkpoints(folder):
        return f"--resume: no checkpoint in {str(folder)!r} yet; starting at step 0"
    return None


def replaces_stage1(cfg: PersonalizeConfig) -> bool:
    """Whether a `--stage 2` run may replace --out without --force: the file is the concept the `--stage 1`
    run of the same work folder wrote (the documented two-command flow)."""
    if cfg.stages != (2,):
        return False
    try:
        with safe_open(str(cfg.out), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("train_config", "{}"))
    except Exception:  # not a concept file of ours: --force decides
        return False
    return saved.get("stages") == [1] and saved.get("work_dir") == cfg.work_dir


def _start_checkpoint(cfg: PersonalizeConfig) -> Checkpoint | None:
    folder = cfg.work / "checkpoints"
    found = list_checkpoints(folder)
    if cfg.resume:
        return load_checkpoint(found[-1]) if found else None
    if cfg.stages == (2,):
        require(not any(p.name.startswith("stage2") for p in found),
                f"{folder} already holds stage-2 checkpoints; pass --resume to continue them, "
                "or choose another --work-dir")
        final = checkpoint_path(folder, 1, cfg.steps1)
        final = next((p for p in (final, dcp_checkpoint_path(folder, 1, cfg.steps1)) if p.exists()), final)
        require(final.exists(), f"stage 2 needs the finished stage 1 ({final}), which does not exist; "
                                 "run --stage 1 first with the same --out / --work-dir / --steps1")
        return load_checkpoint(final)
    require(not found, f"{folder} already holds checkpoints ({found[-1].name if found else ''}); "
                       "pass --resume to continue that run, or choose another --work-dir")
    return None


def _check_resume_config(cfg: PersonalizeConfig, saved: dict, stage: int, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: same settings, except the RESUME_FREE ones
    (and the motion prompts when the checkpoint is from stage 1: a `--stage 1` run may lack them)."""
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in RESUME_FREE | {"concepts"} and _js(now[k]) != _js(saved.get(k)))
    keys = ("video", "prompt", "token", "motion_token") + (("motion_prompt",) if stage == 2 else ())
    if _js(_pick(now["concepts"], keys)) != _js(_pick(saved.get("concepts", []), keys)):
        diff.append("concepts")
    if diff:
        first = diff[0]
        raise ValueError(f"checkpoint {path} was written with different settings for {diff} "
                         f"(e.g. {first}: {saved.get(first)!r} then, {now.get(first)!r} now); resume with "
                         "the same options, or start fresh with another --work-dir")


# RESUME_FREE settings a resume does not record: how and where this invocation runs.
_UNRECORDED = {"resume", "force", "progress", "out", "work_dir", "stages", "resumed"}


def _record_changes(cfg: PersonalizeConfig, ckpt: Checkpoint) -> None:
    """cfg.resumed: the checkpoint's history plus this resume's changes of RESUME_FREE settings, said in
    one line (the concept file and later checkpoints keep it)."""
    saved, now = ckpt.config, cfg.to_dict()
    changed = {k: [saved.get(k), now[k]] for k in sorted(RESUME_FREE - _UNRECORDED)
               if k in saved and _js(saved[k]) != _js(now[k])}
    cfg.resumed = tuple(saved.get("resumed", ()))
    if changed:
        cfg.resumed += ({"stage": ckpt.stage, "step": ckpt.step, "changed": changed},)
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        print(f"setseq personalize: note: continuing {ckpt.path.name} with changed settings: {said} "
              "(recorded in the concept file's train_config.resumed)", file=sys.stderr)


def _pick(concepts: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{k: c.get(k) for k in keys} for c in concepts]


def _js(value) -> str:
    return json.dumps(value, sort_keys=True)
