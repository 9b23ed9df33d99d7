"""What every toy experiment (demo, bench, compose) does around its own measurements: pick the base,
generate and score a list of jobs with a concept applied, and run a plan of named runs.

A plan's run is saved to OUT/runs/NAME.json (and, where the experiment keeps videos, the first video of
each job to NAME.npz) as soon as it is made, so an interrupted bench keeps every finished run, and a
rerun reuses each record whose key still fits: the same base weights (by whatever path they are read),
budget and experiment settings.

    plan ──run_plan──► saved record fits? ── yes ──► reuse it
                                           └─ no ──► make(stale record) ──► save ──► record
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from toyworld import experiment as X

Videos = dict[str, np.ndarray]  # job name -> (T, H, W, 3) uint8: the first video of each job


def resolve_base_arg(base: str | None, quick: bool) -> str:
    """BASE when given, else the committed tiny base; a smoke run without one takes a random tiny base.
    A preset name with committed weights (tiny, tiny-conv) names their folder, as it does for `setseq
    personalize`; only a --quick smoke run reads a preset name as random weights."""
    from weights.base import COMMITTED

    if base is not None:
        if not quick and base in COMMITTED and COMMITTED[base].is_dir():
            return str(COMMITTED[base])
        return base
    if X.DEFAULT_BASE.is_dir():
        return str(X.DEFAULT_BASE)
    if quick:
        return "tiny"
    raise FileNotFoundError(
        f"no committed tiny base at {X.DEFAULT_BASE}; train it with "
        "`setseq pretrain --preset tiny` (about an hour on 2 cores) or pass --base DIR"
    )


# ------------------------------------------------------------------------------------------ one run


@dataclass
class Generated:
    """One job's videos, (3, T, H, W) in [-1, 1], one per seed, and their scores."""

    job: X.Job
    videos: list[Tensor]
    scores: list[dict[str, float]]


Scorer = Callable[[X.Job, list[Tensor]], list[dict[str, float]]]


def generate_jobs(pipe, adapter: str | None, jobs: list[X.Job], world, budget: X.ToyBudget,
                  score: Scorer) -> list[Generated]:
    """Each job's videos (all its seeds in one sampling run) and score(job, videos)."""
    out = []
    for job in jobs:
        videos = X.generate_videos(pipe, adapter, job, world, budget)
        out.append(Generated(job, videos, score(job, videos)))
    return out


CEILING = X.Job("vae_roundtrip", "(reference encoded and decoded, no sampling)", 0.0, 0.0, seeds=(0,))


def ceiling(pipe, reference: np.ndarray, score: Scorer) -> Generated:
    """The reference through the base's VAE alone, scored as a generation: no generation in this latent
    space can beat it."""
    videos = [X.vae_roundtrip(pipe, reference)]
    return Generated(CEILING, videos, score(CEILING, videos))


# ------------------------------------------------------------------------------------------- a plan


@dataclass(frozen=True)
class Planned:
    """One run of a plan: its name (OUT/runs/NAME.json), whether a saved record answers it, and how to
    make its (record, first videos), given the saved record that did not fit (it may hold a trained
    concept worth reusing) or None."""

    name: str
    fits: Callable[[dict], bool]
    make: Callable[[dict | None], tuple[dict, Videos | None]]


def same_key(saved: Mapping, key: Mapping) -> bool:
    """Whether a record was saved under KEY: the same base (same_base), every other key field equal, its
    budget read with the fields added since at their defaults (experiment.saved_budget)."""
    old = {**saved, "budget": X.saved_budget(saved.get("budget", {}))}
    return same_base(old, key) and all(old.get(k) == v for k, v in key.items() if k not in ("base", BASE_ID))


def trained_before(record: Path, files: list[Path]) -> bool:
    """Whether every concept file is there and no newer than the saved RECORD: a newer one is from a later run
    that never finished, so it is not the record's."""
    return all(f.is_file() and f.stat().st_mtime <= record.stat().st_mtime for f in files)


BASE_ID = "base_sha256"
MODEL_FILES = (".safetensors", ".model")  # with config.json: what a base folder's loader reads


def base_key(base_arg: str) -> dict:
    """A key's base: the path as given (for people) and, for a folder, a digest of its model files."""
    digest = base_files_digest(base_arg)
    return {"base": base_arg, **({BASE_ID: digest} if digest else {})}


@functools.cache
def base_files_digest(base_arg: str | None) -> str | None:
    """sha256 of a base folder's config and model files; None for a preset name or a missing folder."""
    folder = Path(base_arg) if base_arg else None
    if folder is None or not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix in MODEL_FILES:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def same_base(saved: Mapping, key: Mapping) -> bool:
    """Same weights: equal digests where both have one, so a base read by another path (or a moved runs
    folder) still fits and a base retrained in place does not; else (a record saved before digests,
    or a preset) the same path, or the digest of the folder the saved path names now."""
    if "base" not in key:
        return True
    mine, theirs = key.get(BASE_ID), saved.get(BASE_ID)
    if mine and theirs:
        return mine == theirs
    if saved.get("base") == key["base"]:
        return True
    theirs = theirs or base_files_digest(saved.get("base"))
    return mine is not None and mine == theirs


@dataclass(frozen=True)
class Store:
    """OUT/runs/: each finished run's record and, with `videos`, the first video of each of its jobs."""

    folder: Path
    fresh: bool = False  # ignore what is saved: every run is made again
    videos: bool = False

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def saved(self, name: str) -> dict | None:
        path = self.path(name)
        if self.fresh or not path.is_file() or self.videos and not path.with_suffix(".npz").is_file():
            return None
        return json.loads(path.read_text())

    def saved_videos(self, name: str) -> Videos | None:
        if not self.videos:
            return None
        with np.load(self.path(name).with_suffix(".npz")) as z:
            return {k: z[k] for k in z.files}

    def save(self, name: str, record: dict, videos: Videos | None) -> dict:
        """Write the record (after its videos: a record without them is made again); returns it as read
        back, so a new record and a reused one look the same (NaN saved as null)."""
        from toyworld.report import clean_json
        from weights.io import write_atomic, write_json_atomic

        path = self.path(name)
        if self.videos:
            write_atomic(path.with_suffix(".npz"), lambda tmp: _savez(tmp, videos))
        write_json_atomic(path, clean_json(record))
        return json.loads(path.read_text())


def _savez(path: str, videos: Videos) -> None:
    with open(path, "wb") as f:  # a file object: savez would append .npz to a path
        np.savez_compressed(f, **videos)


def fetch(store: Store, run: Planned) -> tuple[dict, Videos | None]:
    """The saved record of RUN when it fits, else one made now and saved."""
    return _reuse_or_make(store, run, store.saved(run.name))


def _reuse_or_make(store: Store, run: Planned, saved: dict | None) -> tuple[dict, Videos | None]:
    if saved is not None and run.fits(saved):
        return saved, store.saved_videos(run.name)
    record, videos = run.make(saved)
    return store.save(run.name, record, videos), videos


@dataclass
class Done:
    """What a plan left: the records in plan order, each run's first videos, the runs not made."""

    records: list[dict] = field(default_factory=list)
    videos: dict[str, Videos | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def merged(self, other: Done) -> Done:
        videos = {**self.videos, **other.videos}
        return Done(self.records + other.records, videos, self.missing + other.missing)


def run_plan(plan: list[Planned], store: Store, *, table_only: bool = False, progress: bool = True,
             desc: str = "runs") -> Done:
    """Every run of PLAN, reused or made (fetch); with table_only, a run without a fitting record is
    listed as missing and never made."""
    from tqdm.auto import tqdm

    done = Done()
    for run in tqdm(plan, desc=desc, disable=not progress):
        saved = store.saved(run.name)
        if table_only and (saved is None or not run.fits(saved)):
            done.missing.append(run.name)
            continue
        record, videos = _reuse_or_make(store, run, saved)
        done.records.append(record)
        done.videos[run.name] = videos
    return done


__all__ = ["resolve_base_arg", "Generated", "generate_jobs", "ceiling", "Planned", "same_key", "Store",
           "fetch", "Done", "run_plan"]
