"""The compose bench (`setseq bench compose`): per training seed, each composition method of
toyworld/compose.py trained and scored once (saved in OUT/runs/ by toyworld/runner.py, with the first video
of each job), the floors once, then OUT/compose.md, OUT/compose.json and OUT/compose.png.

The default budget, `ours` at 300 + 1200 steps per concept (joint runs 600 + 2400) on each clip and its 3
repaints, and 4 generations per prompt and order, takes about 30 minutes a seed on 2 cores (a joint run
~12 minutes on one thread). `--pair all --seeds 2` (the full protocol: 3 pairs x 2 seeds) takes about 3
hours; `--shard I/N` splits it over processes, and a last run without --shard tabulates. --quick takes
about 15 s. A rerun that changes only how it samples (guidance, sample steps, samples) reuses the trained
concept files and samples again (about a minute a run).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toyworld import compose as C
from toyworld import experiment as X
from toyworld.compose_report import aggregate, contact_sheet, pooled, render_markdown
from toyworld.runner import (
    Planned,
    Store,
    base_key,
    fetch,
    resolve_base_arg,
    run_plan,
    same_key,
    trained_before,
)

if TYPE_CHECKING:
    from toyworld.bench import BenchSettings


def keyed(made: tuple[dict, dict], key: dict) -> tuple[dict, dict]:
    """A compose record keeps its key apart from its own fields."""
    record, videos = made
    return {**record, "key": key}, videos


def key_fits(key: dict):
    return lambda saved: same_key(saved_key(saved.get("key") or {}), key)


# A method's fields in a record's key: its label is prose (reworded freely), and a field added since a
# record was saved reads as its default, which is what the run had.
METHOD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(C.Method)
                   if f.default is not dataclasses.MISSING}


def method_key(method: C.Method) -> dict:
    return {k: v for k, v in dataclasses.asdict(method).items() if k != "label"}


def saved_key(key: dict) -> dict:
    if "method" not in key:
        return key
    return {**key, "method": {k: v for k, v in {**METHOD_DEFAULTS, **key["method"]}.items() if k != "label"}}


def sampled_as(saved: dict, key: dict) -> dict:
    """A saved key with KEY's sampling settings (experiment.SAMPLING_FIELDS): what it would be had it only
    sampled as KEY does."""
    budget = {**X.saved_budget(saved.get("budget", {})), **{f: key["budget"][f] for f in X.SAMPLING_FIELDS}}
    return {**saved, "budget": budget}


@dataclass
class ComposeBench:
    """What every run of a compose bench shares; `key`: what each saved record must match (a method
    run's adds its seed)."""

    out: Path
    base: X.ToyBase
    pair: C.Pair
    budget: X.ToyBudget
    key: dict
    progress: bool

    @classmethod
    def setup(cls, s: BenchSettings, base_arg: str, pair: tuple, budget: X.ToyBudget) -> ComposeBench:
        """The base (with room for a stitched pair's prompt) and the pair's reference clips."""
        from toyworld.world import ToyWorldConfig

        out = Path(s.out or "runs/bench-compose")
        base = C.widen_context(X.ToyBase(base_arg, out / "work", seed=0))
        made = C.Pair.make(*pair, ToyWorldConfig(), out / "work")
        # "scene": records saved before the new-scene compositions existed lack them, so they rerun
        key = {**base_key(base_arg), "pair": [c.name for c in pair], "budget": X.describe_budget(budget),
               "scene": made.scene}
        return cls(out, base, made, budget, key, s.progress)

    def floors(self) -> Planned:
        return Planned("floors", key_fits(self.key), self.make_floors)

    def make_floors(self, _stale: dict | None) -> tuple[dict, dict]:
        return keyed(C.floors(self.base, self.pair, self.budget), self.key)

    def planned(self, method: C.Method, seed: int) -> Planned:
        name, key = f"{method.key}-s{seed}", {**self.key, "seed": seed, "method": method_key(method)}
        if method.joint:  # records saved before joint runs took the rank per concept shared one's: rerun
            key["rank"] = "per concept"

        def make(saved: dict | None) -> tuple[dict, dict]:
            return keyed(self.make_run(name, method, seed, self.trained(name, method, saved, key)), key)

        return Planned(name, key_fits(key), make)

    def trained(self, name: str, method: C.Method, saved: dict | None, key: dict) -> dict[str, float] | None:
        """The training seconds per concept file of a saved run that differs from KEY only in how it samples
        (guidance, sample steps, samples), its files still there and older than its record (a newer one is
        from a later run that never finished); else None."""
        if saved is None or not same_key(sampled_as(saved_key(saved.get("key") or {}), key), key):
            return None
        files = C.concept_files(method, self.pair, self.out / "work" / name)
        if not trained_before(self.out / "runs" / f"{name}.json", files):
            return None
        return saved.get("train_seconds_per_run")  # a record too old to say trains again

    def make_run(self, name: str, method: C.Method, seed: int, trained: dict[str, float] | None
                 ) -> tuple[dict, dict]:
        work = self.out / "work" / name
        record, firsts = C.run_method(self.base, method, self.pair, self.budget, work, seed, self.progress,
                                      trained=trained)
        c, d = pooled([record], "compose"), pooled([record], "compose_ba")
        print(f"  {name}: crop own − other, A|B {c['a_crop_margin']['mean']:.3g} / "
              f"{c['b_crop_margin']['mean']:.3g}, B|A {d['b_crop_margin']['mean']:.3g} / "
              f"{d['a_crop_margin']['mean']:.3g}; motion A|B {c['a_motion']['mean']:.3g} / "
              f"{c['b_motion']['mean']:.3g}"
              + (" (trained concepts reused)" if trained else f" ({record['train_seconds']:.0f} s training)"))
        return record, firsts


def run(s: BenchSettings) -> dict:
    """Every pair --pair names (several: each into OUT/<a>+<b>/, then OUT/compose-all.md pooled over
    them); the report data of the one pair, or of the pooled protocol, with the paths written ('paths')."""
    from toyworld.bench import parse_shard

    budget = dataclasses.replace(C.QUICK if s.quick else C.COMPOSE, **s.budget)
    if budget.companions:  # a single-concept option (toyworld/experiment.personalize)
        raise ValueError("--companions: not used by bench compose (each pair trains on its two concepts' "
                         "clips; setseq demo and bench toyworld take it); drop the flag")
    pairs, methods = C.pick_pairs(s.pair), C.pick_methods(s.variants)
    base_arg, out = resolve_base_arg(s.base, s.quick), Path(s.out or "runs/bench-compose")
    shard = parse_shard(s.shard)
    if len(pairs) == 1:
        return run_pair(s, base_arg, pairs[0], budget, methods, out, shard)
    folders = [pair_folder(a, b) for a, b in pairs]  # a bad name fails here, before any training
    per_pair = {f: run_pair(s, base_arg, (a, b), budget, methods, out / f, shard)
                for f, (a, b) in zip(folders, pairs, strict=True)}
    return protocol_report(per_pair, out)


def pair_folder(a: str, b: str) -> str:
    """A pair's folder under OUT, '<a>+<b>' by the concepts' names: a TOML path gives its concept's name,
    not a path nested under OUT."""
    from toyworld.concepts import load_concept

    return "+".join(load_concept(x).name for x in (a, b))


def run_pair(s: BenchSettings, base_arg: str, pair_names: tuple[str, str], budget: X.ToyBudget,
             methods: tuple, out: Path, shard: tuple[int, int]) -> dict:
    """Every (method, seed) of one pair not saved yet, then OUT/compose.md, .json and .png."""
    from toyworld.concepts import load_concept
    from toyworld.report import write_report

    start = time.perf_counter()
    a, b = (load_concept(n) for n in pair_names)  # a bad name fails here, before any training
    if a.name == b.name:
        raise ValueError(f"--pair: both concepts are named {a.name!r}; give two different concepts")
    bench = ComposeBench.setup(dataclasses.replace(s, out=str(out)), base_arg, (a, b), budget)
    seeds = 1 if s.seeds is None else s.seeds
    print(f"bench compose: {a.name} + {b.name} (both orders), {len(methods)} methods x {seeds} seeds "
          f"on base {base_arg}")
    store = Store(bench.out / "runs", fresh=s.fresh, videos=True)
    floor, floor_videos = fetch(store, bench.floors())
    plan = [bench.planned(m, seed) for seed in range(seeds) for m in methods]
    mine = run_plan(plan[shard[0]::shard[1]], store, table_only=s.table_only, progress=s.progress,
                    desc="compose runs")
    others = [p for i, p in enumerate(plan) if i % shard[1] != shard[0]]  # other shards': saved or missing
    done = mine.merged(run_plan(others, store, table_only=True, progress=False))
    data = {
        "command": "setseq bench compose", "base": base_arg, "random_base": bench.base.random,
        "pair": [a.name, b.name], "seeds": seeds, "budget": X.describe_budget(budget),
        "max_length": bench.base.cfg.t5.max_length, "stitch_prob": C.STITCH_PROB,
        "methods": [dataclasses.asdict(m) for m in methods],
        "prompts": {k: j.prompt for k, j in bench.pair.jobs((0,)).items()}, "floors": floor,
        "table": aggregate(done.records, floor, methods), "records": done.records, "missing": done.missing,
    }
    data["seconds"] = time.perf_counter() - start
    sheet = contact_sheet(bench.out, bench.pair, {"floors": floor_videos, **done.videos})
    md, js = write_report(bench.out, render_markdown(data), data, stem="compose")
    return data | {"paths": {"markdown": str(md), "json": str(js), "sheet": str(sheet)}}


def protocol_report(per_pair: dict[str, dict], out: Path) -> dict:
    """OUT/compose-all.md / .json: the goals pooled over pairs (toyworld/compose_protocol.py)."""
    from toyworld.compose_protocol import SCENE, protocol_summary, render_protocol
    from toyworld.report import write_report

    summary_, scene = protocol_summary(per_pair), protocol_summary(per_pair, SCENE)
    md, js = write_report(out, render_protocol(per_pair, summary_, scene),
                          {"pairs": list(per_pair), "summary": summary_, "scene": scene}, stem="compose-all")
    return {"command": "setseq bench compose", "protocol": True, "summary": summary_, "scene": scene,
            "per_pair": per_pair, "paths": {"markdown": str(md), "json": str(js)}}


def summary(data: dict) -> str:
    """What `setseq bench compose` prints when it is done: both tables (or the pooled protocol), the time,
    where the reports are."""
    p = data["paths"]
    if data.get("protocol"):
        return "\n".join([Path(p["markdown"]).read_text(), f"table: {p['markdown']}", f"json: {p['json']}"])
    return "\n".join(["\n\n".join(render_markdown(data).split("\n\n")[2:6]),
                      f"bench compose finished in {data['seconds']:.0f} s",
                      f"contact sheet: {p['sheet']}", f"table: {p['markdown']}", f"json: {p['json']}"])


__all__ = ["ComposeBench", "run", "summary"]
