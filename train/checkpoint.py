"""Training checkpoints: trained tensors, optimizer state, every RNG state, step, stage, config.

One safetensors file per checkpoint, written atomically (a temporary file in the same folder,
fsync, then os.replace), so a crash mid-write leaves the previous checkpoint intact and never a
half file under the real name. Non-tensor state (step, stage, config, the optimizer's param
groups, Python's and NumPy's RNG scalars) is JSON in the safetensors metadata.

Layout of the tensor keys:
    param.<name>              trained tensors (LoRA factors, token embeddings)
    optim.<i>.<key>           optimizer per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
    rng.torch, rng.cuda.<i>   torch's global CPU / CUDA generator states (uint8)
    rng.data                  the loop's own generator (uint8)
    rng.numpy                 NumPy's MT19937 key (uint32)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.safetensors_header import sort_metadata
from model.tempfiles import kill_point, publish, temp_path

# .dcp: the folder a several-process run writes (train/checkpoint_dcp.py); either kind resumes either run
_NAME = re.compile(r"^stage(\d)-step(\d{6})\.(safetensors|dcp)$")


@dataclass
class Checkpoint:
    """What a checkpoint holds once read back."""

    stage: int
    step: int
    params: dict[str, Tensor]
    optimizer: dict  # an optimizer.state_dict()
    rng: dict  # see capture_rng / restore_rng
    config: dict
    path: Path


def checkpoint_path(folder: str | Path, stage: int, step: int) -> Path:
    return Path(folder) / f"stage{stage}-step{step:06d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first by (stage, step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def capture_rng(data_generator: torch.Generator) -> dict:
    """Every RNG the loop draws from: torch (CPU + CUDA), NumPy, Python, and the data generator."""
    state = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_optimizer(sd: dict) -> tuple[dict[str, Tensor], list]:
    tensors = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, Tensor], groups: list) -> dict:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | Path,
    *,
    stage: int,
    step: int,
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict,
    config: dict,
) -> Path:
    """Write one checkpoint atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    optim_tensors, groups = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = rng["torch"]
    tensors["rng.data"] = rng["data"]
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s
    kind, key, pos, has_gauss, cached = rng["numpy"]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64))
    version, py_state, gauss = rng["python"]
    meta = {
        "format": "setseq.train_checkpoint",
        "stage": str(stage),
        "step": str(step),
        "config": json.dumps(config),
        "param_groups": json.dumps(groups),
        "rng_numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "rng_python": json.dumps([version, list(py_state), gauss]),
    }
    tmp = temp_path(path)  # a killed write's temporary is removed by the next run (resume_point)
    save_file(tensors, str(tmp), metadata=meta)
    sort_metadata(tmp)  # byte-identical files across processes
    with open(tmp, "rb+") as f:  # the bytes are on disk before the name points at them
        os.fsync(f.fileno())
    kill_point("checkpoint")
    publish(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.suffix == ".dcp":
        from .checkpoint_dcp import load_dcp_checkpoint  # that module builds on this one

        return load_dcp_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"cannot read training checkpoint {str(path)!r}: {err}") from err
    if meta.get("format") != "setseq.train_checkpoint":
        raise ValueError(f"{str(path)!r} is not a setseq training checkpoint (format {meta.get('format')!r})")
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    kind, pos, has_gauss, cached = json.loads(meta["rng_numpy"])
    version, py_state, gauss = json.loads(meta["rng_python"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    rng = {
        "torch": tensors["rng.torch"],
        "data": tensors["rng.data"],
        "numpy": (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(py_state), gauss),
    }
    if cuda:
        rng["cuda"] = cuda
    return Checkpoint(
        stage=int(meta["stage"]), step=int(meta["step"]), params=params,
        optimizer=_unflatten_optimizer(optim, json.loads(meta["param_groups"])),
        rng=rng, config=json.loads(meta["config"]), path=path,
    )


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of `folder` (the final one of each stage stays)."""
    found = list_checkpoints(folder)
    finals = {}
    for p in found:
        m = _NAME.match(p.name)
        finals[int(m[1])] = p  # the last (highest step) of each stage
    for p in found[: max(0, len(found) - keep)]:
        if p not in finals.values():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
