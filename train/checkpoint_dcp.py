"""Training checkpoints of a several-process run: a `torch.distributed.checkpoint` (DCP) folder.

    checkpoints/stage1-step000200.dcp/
        .metadata, __<rank>_0.distcp   DCP: each rank writes its own shards of the sharded tensors
        setseq.json                    stage, step, config, the optimizer's param groups, every RNG state

Tensor keys are those of the one-file format (train/checkpoint.py): `param.<name>` (LoRA factors, token
embeddings) and `optim.<i>.<key>` (AdamW state, in optimizer order). The RNG states are the same on every
rank (every rank draws the same global batch, train/distributed.py), so rank 0's are written; the CUDA
one is the writing rank's own GPU's.

Written into rank 0's hidden temporary folder (`.<name>.partial-PID`, model/tempfiles.py: the next run
removes it if its process is gone) and renamed once complete, so a run killed mid-write leaves the previous
checkpoint as the latest one. Read back as whole tensors (`load_dcp_checkpoint`, no process group needed),
so one plain process, or a run with another number of processes, continues it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader

from model.tempfiles import kill_point, publish, temp_path

from .checkpoint import Checkpoint

META = "setseq.json"


def dcp_checkpoint_path(folder: str | Path, stage: int, step: int) -> Path:
    return Path(folder) / f"stage{stage}-step{step:06d}.dcp"


def save_dcp_checkpoint(path: str | Path, *, stage: int, step: int, params: dict[str, Tensor],
                        optimizer: torch.optim.Optimizer, generator: torch.Generator, config: dict) -> Path:
    """Every rank calls this together; each writes its shards, rank 0 the metadata and the rename."""
    path = Path(path)
    main = dist.get_rank() == 0
    names = [str(temp_path(path, "partial"))]  # rank 0's: every rank writes into the one folder
    dist.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {f"param.{k}": v.detach() for k, v in params.items()}
    sd = optimizer.state_dict()
    state.update({f"optim.{i}.{key}": v for i, s in sd["state"].items() for key, v in s.items()})
    dcp.save(state, checkpoint_id=str(tmp))
    if main:
        meta = {"format": "setseq.train_checkpoint.dcp", "stage": stage, "step": step, "config": config,
                "param_groups": sd["param_groups"], "rng": _capture_rng(generator)}
        with open(tmp / META, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        kill_point("checkpoint")  # tests: SIGKILL between the write and the rename
        shutil.rmtree(path, ignore_errors=True)
        publish(tmp, path)
    dist.barrier()  # no rank goes on (or prunes) before the checkpoint is in place
    return path


def load_dcp_checkpoint(path: str | Path) -> Checkpoint:
    """A DCP checkpoint as whole tensors on the CPU, whatever the number of processes that wrote it."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        reader = FileSystemReader(str(path))
        stored = reader.read_metadata().state_dict_metadata
        state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()}
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one reader, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as err:
        raise ValueError(f"cannot read training checkpoint {str(path)!r}: {err}") from err
    if meta.get("format") != "setseq.train_checkpoint.dcp":
        raise ValueError(f"{str(path)!r} is not a setseq training checkpoint (format {meta.get('format')!r})")
    params = {k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}
    optim: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            optim.setdefault(int(idx), {})[name] = value
    return Checkpoint(stage=meta["stage"], step=meta["step"], params=params,
                      optimizer={"state": optim, "param_groups": meta["param_groups"]},
                      rng=_restore_form(meta["rng"]), config=meta["config"], path=path)


def _capture_rng(generator: torch.Generator) -> dict:
    """The RNG states as JSON: byte states as lists, NumPy's key as a list, Python's as given."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state().tolist(), "data": generator.get_state().tolist(),
           "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(cached)],
           "python": _listed(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [torch.cuda.get_rng_state().tolist()]  # this rank's GPU
    return rng


def _restore_form(rng: dict) -> dict:
    """JSON -> the dict train/checkpoint.py's restore_rng takes."""
    kind, key, pos, has_gauss, cached = rng["numpy"]
    version, state, gauss = rng["python"]
    out = {"torch": torch.tensor(rng["torch"], dtype=torch.uint8),
           "data": torch.tensor(rng["data"], dtype=torch.uint8),
           "numpy": (kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached),
           "python": (version, tuple(state), gauss)}
    if "cuda" in rng:
        out["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]]
    return out


def _listed(value):
    return [_listed(v) for v in value] if isinstance(value, tuple) else value
