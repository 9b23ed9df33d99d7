"""The benches (`setseq bench`): toyworld, the paper's Tables 1 and 2 at toy scale; compose, two dynamic
concepts in one video (toyworld/compose.py).

toyworld rows (same steps, batch and LoRA learning rate for every row; see experiment.variants):
LoRA rank-1 single stage, DB-LoRA (rank = ours, single stage), two-stage without regularization,
two-stage + regularization (ours), textual inversion (tokens only, at a higher token lr).
Columns: reconstruction MSE (training prompt), ID (object crop cosine and colour histogram),
edit adherence (requested background), temporal coherence and motion fidelity (velocity
correlation) of the edited videos; mean ± spread over concepts x seeds, floors in the last row.
Each finished (concept, seed, variant) is saved in OUT/runs/ (toyworld/runner.py), so a rerun skips it.
A rerun that changes only how it samples (guidance, sample steps, samples) reuses the trained concepts
in OUT/work/ and generates again.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from toyworld import compose_bench
from toyworld import experiment as X
from toyworld import prompts as P
from toyworld.bench_report import aggregate, render_markdown, table
from toyworld.runner import (
    Planned,
    Store,
    base_key,
    ceiling,
    generate_jobs,
    resolve_base_arg,
    run_plan,
    same_base,
    same_key,
    trained_before,
)

SUITES = ("toyworld", "compose")


@dataclass(frozen=True)
class BenchSettings:
    """What a bench runs. None: the suite's default (seeds: toyworld 2, compose 1; out: runs/bench,
    runs/bench-compose); `budget`: the ToyBudget fields that change the suite's (or, with quick, the
    smoke) budget. concepts and clip are toyworld's; pair is compose's; variants are either suite's rows
    (compose: its methods)."""

    suite: str = "toyworld"
    base: str | None = None
    concepts: str = "3"  # how many shipped concepts (alphabetical), or names / TOML files "a,b"
    pair: str | None = None
    seeds: int | None = None
    variants: str | None = None
    budget: Mapping = field(default_factory=dict)
    quick: bool = False
    out: str | None = None
    fresh: bool = False  # redo runs already saved in OUT/runs/
    shard: str | None = None  # "I/N": only every N-th run, starting at I
    table_only: bool = False  # train nothing: tabulate the saved runs
    clip: str | None = None  # a local HF CLIP folder: adds the C-T column
    progress: bool = True

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"bench {self.suite!r}: choose from {', '.join(SUITES)}")
        if self.suite == "compose":
            self.check_compose()
        elif self.pair is not None:
            raise ValueError("--pair belongs to `bench compose`; toyworld takes --concepts")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"--seeds {self.seeds}: need at least 1")
        parse_shard(self.shard)

    def check_compose(self) -> None:
        if self.clip is not None:
            raise ValueError("--clip belongs to `bench toyworld` (compose has no C-T column)")
        unused = ["--concepts"] if self.concepts != "3" else []
        if unused:
            raise ValueError(f"{', '.join(unused)} belong to `bench toyworld`; compose takes --pair")


def pick_variants(text: str | None, budget: X.ToyBudget) -> list[X.Variant]:
    if text is None:
        return list(X.variants(budget).values())
    table = X.every_variant(budget)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise ValueError(f"--variants {text!r}: unknown {unknown or 'empty'}; choose from {', '.join(table)}")
    return [table[k] for k in keys]


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: give I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I must lie in 0..N-1")
    return i, n


def pick_concepts(text: str) -> list[str]:
    """'N' (the first N shipped concepts) or 'name,name' (each a shipped name or a TOML path)."""
    from toyworld.concepts import list_concepts

    names = list_concepts()
    if not text.strip().isdigit():
        chosen = [c.strip() for c in text.split(",") if c.strip()]
        if not chosen:
            raise ValueError(f"--concepts {text!r}: give a number or concept names ({', '.join(names)})")
        return chosen
    n = int(text)
    if not 1 <= n <= len(names):
        raise ValueError(f"--concepts {n}: there are {len(names)} held-out concepts ({', '.join(names)})")
    return names[:n]


# ------------------------------------------------------------------------------------------ one run


class EditClip:
    """CLIP-T for the bench: a ClipTextScorer, plus each concept's floor (the unedited reference) and
    target (the world's rendering of the edit) scored once, not once per variant and seed."""

    def __init__(self, folder: str):
        from sample.clip import ClipTextScorer
        from weights.clip import load_clip

        self.scorer, self.cache = ClipTextScorer(*load_clip(folder)), {}

    def __call__(self, frames, text: str) -> float:
        return self.scorer(frames, text)

    def points(self, concept: str, text: str, reference, target) -> dict[str, float]:
        key = (concept, text)
        if key not in self.cache:
            self.cache[key] = {"clip_t_floor": self(reference, text), "clip_t_target": self(target, text)}
        return self.cache[key]


def scorer(spec, reference, targets, clip_scorer: EditClip | None):
    """Scores of a bench job's videos: the recon job's as reconstructions, the edit's as background edits
    (with CLIP-T when a CLIP is given)."""
    from sample.media import to_uint8

    def score(job: X.Job, videos) -> list[dict[str, float]]:  # a bench job is named by its kind
        scores = X.score_job(job.name, videos, reference, targets, spec)
        if job.name == "edit_background" and clip_scorer is not None:
            for s, video in zip(scores, videos, strict=True):
                s["clip_t"] = clip_scorer(to_uint8(video), job.prompt)
        return scores

    return score


EDIT_KEYS = ("id_crop", "id", "edit_background", "temporal_coherence", "motion_fidelity", "trajectory_error",
             "clip_t")


def run_values(rec: dict, ed: dict, ceiling_scores: dict, clip_points: dict) -> dict:
    """A run's one number per column: the reconstruction's means and floors, the CLIP points, the VAE's
    ceiling, the edit's means."""
    values = {
        "mse": rec["mse"]["mean"],
        "mse_floor": rec["mse_floor"]["mean"],
        "recon_motion_fidelity": rec["motion_fidelity"]["mean"],
        "recon_id_crop": rec["id_crop"]["mean"],
        "recon_trajectory_error": rec["trajectory_error"]["mean"],
        "centre_floor": rec["centre_floor"]["mean"],
        "id_crop_floor": rec["id_crop_floor"]["mean"],
        "reference_coherence": rec["reference_coherence"]["mean"],
        **clip_points,
    }
    values.update({f"vae_{k}": ceiling_scores[k] for k in ("mse", "id_crop", "motion_fidelity",
                                                            "temporal_coherence")})
    return values | {k: ed[k]["mean"] for k in EDIT_KEYS if k in ed}


def one_run(base, spec, variant, budget, world, folder: Path, seed: int, progress: bool,
            trained: tuple[Path, float] | None = None, clip_scorer: EditClip | None = None) -> dict:
    """Personalize, generate reconstruction and background edit, score: one record. `trained`: a concept
    file already trained under this budget's training fields, and its training seconds (sampling only).
    `clip_scorer`: adds CLIP-T of the edits, its floor (the unedited reference) and the world's own
    rendering of the edit."""
    from toyworld.report import summarize

    ref = X.reference_clip(spec, world)
    targets = X.edit_targets(spec, world)
    if trained is None:
        video = X.write_lossless(folder / "reference.mp4", ref.video)
        trained = X.personalize(base, spec, variant, budget, video, folder, seed=seed, progress=progress)
    concept_file, seconds = trained
    pipe, adapter = X.concept_pipeline(base, concept_file)
    s = X.seeds(budget.samples, offset=100 * seed)
    jobs = [X.Job("recon", P.full_prompt(spec), seeds=s),
            X.Job("edit_background", P.full_prompt(spec, P.edit_background(spec)), seeds=s)]
    t0 = time.perf_counter()
    score = scorer(spec, ref.video, targets, clip_scorer)
    recon, edit = generate_jobs(pipe, adapter, jobs, world, budget, score)
    points = {} if clip_scorer is None else clip_scorer.points(spec.name, edit.job.prompt, ref.video,
                                                               targets["edit_background"])
    rec, ed = summarize(recon.scores), summarize(edit.scores)
    values = run_values(rec, ed, ceiling(pipe, ref.video, score).scores[0], points)
    return {
        "concept": spec.name,
        "seed": seed,
        "variant": variant.key,
        "label": variant.label,
        "train_seconds": seconds,
        "generate_seconds": time.perf_counter() - t0,
        "values": values,
        "recon": rec,
        "edit": ed,
        "prompts": {"recon": recon.job.prompt, "edit": edit.job.prompt},
    }


def reusable(saved: dict | None, record: Path, concept: Path, budget, base_arg: str
             ) -> tuple[Path, float] | None:
    """(concept file, training seconds) of a saved run that differs from this budget only in how it samples
    (guidance, sample steps, samples), else None. The concept file must be older than the record:
    a newer one is from a later run that never finished."""
    if saved is None or not same_base(saved, base_key(base_arg)):
        return None
    if X.training_budget(saved.get("budget", {})) != X.training_budget(budget):
        return None
    if not trained_before(record, [concept]):
        return None
    return concept, saved["train_seconds"]


# ------------------------------------------------------------------------------------------- a bench


@dataclass
class ToyworldBench:
    """What every run of a toyworld bench shares."""

    settings: BenchSettings
    out: Path
    base_arg: str
    base: X.ToyBase
    budget: X.ToyBudget
    world: object
    store: Store

    @functools.cached_property
    def clip_scorer(self) -> EditClip | None:  # loads when the first run needs it
        return None if self.settings.clip is None else EditClip(self.settings.clip)

    def key(self) -> dict:
        """What a saved record must match: the base, the budget and, when asked for, the CLIP."""
        clip = self.settings.clip
        return {**base_key(self.base_arg), "budget": X.describe_budget(self.budget),
                **({"clip": str(clip)} if clip is not None else {})}

    def planned(self, spec, seed: int, variant: X.Variant) -> Planned:
        name = f"{spec.name}-s{seed}-{variant.key}"
        return Planned(name, lambda saved: same_key(saved, self.key()),
                       lambda saved: (self.make(name, spec, seed, variant, saved), None))

    def make(self, name: str, spec, seed: int, variant: X.Variant, saved: dict | None) -> dict:
        folder = self.out / "work" / name
        trained = reusable(saved, self.store.path(name), folder / f"{variant.key}.safetensors", self.budget,
                           self.base_arg)
        rec = one_run(self.base, spec, variant, self.budget, self.world, folder, seed, self.settings.progress,
                      trained=trained, clip_scorer=self.clip_scorer)
        rec.update(self.key())
        print(run_line(rec, reused=trained is not None))
        return rec


def run_line(rec: dict, reused: bool) -> str:
    """A finished run in one line: its headline numbers and whether it trained."""
    numbers = [f"{k} {rec['values'][k]:.3g}" for k in ("mse", "id_crop", "edit_background", "motion_fidelity")
               if rec["values"].get(k) is not None]
    return (f"  {rec['concept']} seed {rec['seed']} {rec['variant']}: " + ", ".join(numbers)
            + (" (trained concept reused)" if reused else f" ({rec['train_seconds']:.0f} s training)"))


def json_overrides(v: X.Variant) -> dict:
    return {k: list(x) if isinstance(x, tuple) else x for k, x in v.overrides.items()}


def run_toyworld(s: BenchSettings) -> dict:
    """Every (concept, seed, variant) not saved yet, then OUT/bench.md and OUT/bench.json."""
    from toyworld.concepts import load_concept
    from toyworld.report import write_report
    from toyworld.world import ToyWorldConfig

    start = time.perf_counter()
    seeds, out = 2 if s.seeds is None else s.seeds, Path(s.out or "runs/bench")
    budget = dataclasses.replace(X.QUICK if s.quick else X.ToyBudget(), **s.budget)
    variants = pick_variants(s.variants, budget)
    names = pick_concepts(s.concepts)
    base_arg = resolve_base_arg(s.base, s.quick)
    base, store = X.ToyBase(base_arg, out / "work", seed=0), Store(out / "runs", fresh=s.fresh)
    bench = ToyworldBench(s, out, base_arg, base, budget, ToyWorldConfig(), store)
    specs = list({c: load_concept(c) for c in names}.values())  # a bad name fails here, before training
    plan = [(spec, seed, v) for spec in specs for seed in range(seeds) for v in variants]
    print(f"bench toyworld: {len(specs)} concepts x {seeds} seeds x {len(variants)} variants = "
          f"{len(plan)} runs on base {base_arg}")
    if s.clip is not None:
        from weights.clip import check_folder

        check_folder(s.clip)
    shard, shards = parse_shard(s.shard)
    done = run_plan([bench.planned(*p) for p in plan[shard::shards]], bench.store, table_only=s.table_only,
                    progress=s.progress, desc="bench runs")
    data = {
        "command": "setseq bench toyworld", "base": base_arg, "random_base": bench.base.random,
        "concepts": [spec.name for spec in specs], "seeds": seeds, "budget": X.describe_budget(budget),
        "variants": [{"key": v.key, "label": v.label, "overrides": json_overrides(v)} for v in variants],
        "table": aggregate(done.records, variants), "records": done.records,
        "seconds": time.perf_counter() - start, "missing": done.missing,
    }
    md, js = write_report(out, render_markdown(data), data, stem="bench")
    return data | {"paths": {"markdown": str(md), "json": str(js)}}


def run(s: BenchSettings) -> dict:
    """The bench S asks for; its report data, with the paths it wrote ('paths')."""
    return compose_bench.run(s) if s.suite == "compose" else run_toyworld(s)


def summary(data: dict) -> str:
    """What `setseq bench` prints when it is done: the table, the time, where the reports are."""
    if data["command"] == "setseq bench compose":
        return compose_bench.summary(data)
    p = data["paths"]
    return "\n".join([table(data), f"bench finished in {data['seconds']:.0f} s", f"table: {p['markdown']}",
                      f"json: {p['json']}"])


__all__ = ["BenchSettings", "EditClip", "one_run", "reusable", "run", "summary"]
