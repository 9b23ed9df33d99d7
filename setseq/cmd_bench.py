"""`setseq bench toyworld`: the paper's Tables 1 and 2 at toy scale, in one command;
`setseq bench compose`: composition of two dynamic concepts (joint+stitch, joint, post-hoc mixing).

    setseq bench toyworld                        # 3 held-out concepts x 2 seeds x 5 variants
    setseq bench toyworld --concepts 1 --seeds 1 --variants ours,dblora --samples 2
    setseq bench toyworld --quick --base tiny    # smoke run on a random base
    setseq bench compose                         # checker_eight (left) + split_hop_spin (right), 1 seed
    setseq bench compose --pair stripes_stutter,checker_eight --seeds 2 --out runs/compose-sc
    setseq bench compose --quick --base tiny     # smoke run on a random base

Rows (same steps, batch and LoRA learning rate for every row; see experiment.variants):
LoRA rank-1 single stage, DB-LoRA (rank = ours, single stage), two-stage without regularization,
two-stage + regularization (ours), textual inversion (tokens only, at a higher token lr).
Columns: reconstruction MSE (training prompt), ID (object crop cosine and colour histogram),
edit adherence (requested background), temporal coherence and motion fidelity (velocity
correlation) of the edited videos; mean ± spread over concepts x seeds, floors in the last row.
Each finished (concept, seed, variant) is saved in OUT/runs/, so a rerun skips it (--fresh redoes all).
A rerun that changes only how it samples (--guidance, --sample-steps, --samples) reuses the trained concepts
in OUT/work/ and generates again.

compose (toyworld/compose.py): per seed, one joint run with stitched pairs, one without, and two
single runs mixed at generation; the composition prompt puts A in the left half and B in the right
(the world's two-object grammar), plus each concept alone. Per half: ID to its own concept, ID to the
other (leakage) and their difference, motion (per-axis velocity correlation), beside floors.
Default budget: `ours` at 200 + 400 steps per concept (joint runs 400 + 800), 2 generations per
prompt: 3600 training steps per seed, about 9 minutes on 2 cores (a 150 + 300 single run took 60 s on
a loaded machine, 0.13 s a step; 12 minutes at 0.18 s a step); the experiment module's 300 + 600 (--steps1 300
--steps2 600) took about 13-18 minutes, and its full 600 + 1200 should take twice that. --quick takes
about 15 s.
OUT: compose.md, compose.json, compose.png, runs/ (cached per method and seed; --fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toyworld import experiment as X

# (key in a run's record, header, source job)
COLUMNS = [
    ("mse", "MSE ↓", "recon"),
    ("id_crop", "ID crop ↑", "edit"),
    ("id", "ID colour ↑", "edit"),
    ("edit_background", "edit adherence ↑", "edit"),
    ("temporal_coherence", "TC ↑", "edit"),
    ("motion_fidelity", "motion fidelity ↑", "edit"),
    ("recon_motion_fidelity", "recon motion fidelity ↑", "recon"),
    ("recon_id_crop", "recon ID crop ↑", "recon"),
    ("clip_t", "C-T ↑", "edit"),  # only with --clip (local CLIP weights)
]
NO_CLIP = "not available (--clip)"
FLOORS = {
    "mse": "mse_floor",
    "id_crop": "id_crop_floor",
    "temporal_coherence": "reference_coherence",
    "recon_id_crop": "id_crop_floor",
    "clip_t": "clip_t_floor",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="reproduce Tables 1-2 at toy scale (toyworld) or measure composition of two concepts (compose)",
        description="toyworld: personalize held-out toy-world concepts with each variant (LoRA-1, DB-LoRA, "
        "two-stage, ours, textual inversion), generate reconstructions and background edits, and tabulate "
        "pixel metrics as mean ± spread with their floors. compose: put two held-out concepts in one video "
        "(joint training with and without stitched pairs, post-hoc mixing) and measure each half's identity, "
        "leakage and motion.",
    )
    p.add_argument("suite", choices=("toyworld", "compose"), help="which benchmark (toyworld, compose)")
    p.add_argument("--base", help="base model folder or preset (default: assets/tiny)")
    p.add_argument(
        "--concepts",
        default="3",
        help="held-out concepts: how many from examples/concepts (alphabetical), or comma-separated names "
        "(default 3)",
    )
    p.add_argument("--pair", help="compose: two concepts A,B (names or TOML files; default the first two "
                   "of examples/concepts)")
    p.add_argument("--seeds", type=int, help="training seeds per concept (default: toyworld 2, compose 1)")
    p.add_argument("--variants", help=f"comma-separated rows (default {','.join(X.variants(X.ToyBudget()))}; "
                   f"also {','.join(X.extra_variants(X.ToyBudget()))})")
    p.add_argument("--samples", type=int, help="generations per prompt (default 4, compose 2; quick 1)")
    p.add_argument(
        "--steps1", type=int, help="stage-1 steps (default 600, compose 200 per concept; single-stage rows "
        "get steps1 + steps2)"
    )
    p.add_argument("--steps2", type=int, help="stage-2 steps (default 1200, compose 400 per concept)")
    p.add_argument("--lr", type=float, help="LoRA learning rate of every row (default 1e-3)")
    p.add_argument("--prior-weight", dest="prior_weight", type=float,
                   help="weight of the prior-preservation loss beside the concept's (default 0.25)")
    p.add_argument("--prior-pairs", dest="prior_pairs", type=int,
                   help="how many of the 8 prior-preservation prompts have two objects (default 0)")
    p.add_argument("--guidance", type=float,
                   help="sampling guidance (default 1: personalized tiny concepts measured better than at 3, "
                   "the tiny base's default before); a toyworld rerun that changes only --guidance, "
                   "--sample-steps or --samples reuses the trained concepts")
    p.add_argument("--sample-steps", dest="sample_steps", type=int,
                   help="Euler steps per generation (default: the base model's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, one sample (seconds a run)")
    p.add_argument("--out", help="results folder (default runs/bench; compose runs/bench-compose)")
    p.add_argument("--fresh", action="store_true", help="redo runs already saved in OUT/runs/")
    p.add_argument(
        "--shard",
        help="I/N: run only every N-th run starting at I (0-based), e.g. two processes "
        "0/2 and 1/2 on two cores; a final run without --shard tabulates them all",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: tabulate the runs already saved in OUT/runs/ (an interrupted bench)",
    )
    p.add_argument("--clip", help="toyworld: a local HF CLIP folder; adds the paper's C-T column (CLIP-T of "
                   "the background edits and their prompt; without it the column says not available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def pick_variants(text: str | None, budget) -> list[X.Variant]:
    if text is None:
        return list(X.variants(budget).values())
    table = {**X.variants(budget), **X.extra_variants(budget)}
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise ValueError(f"--variants {text!r}: unknown {unknown or 'empty'}; choose from {', '.join(table)}")
    return [table[k] for k in keys]


def budget_overrides(args: argparse.Namespace) -> dict:
    """The budget fields given on the command line."""
    names = ("samples", "steps1", "steps2", "lr", "prior_weight", "prior_pairs", "guidance", "sample_steps")
    given = {k: getattr(args, k) for k in names}
    return {k: v for k, v in given.items() if v is not None}


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


def one_run(base, spec, variant, budget, world, folder: Path, seed: int, progress: bool,
            trained: tuple[Path, float] | None = None, clip_scorer=None) -> dict:
    """Personalize, generate reconstruction and background edit, score: one record. `trained`: a concept
    file already trained under this budget's training fields, and its training seconds (sampling only).
    `clip_scorer` (EditClip): adds CLIP-T of the edits, its floor (the unedited reference) and the
    world's own rendering of the edit."""
    from toyworld.report import summarize

    ref = X.reference_clip(spec, world)
    targets = X.edit_targets(spec, world)
    if trained is None:
        video = X.write_lossless(folder / "reference.mp4", ref.video)
        concept_file, seconds = X.personalize(
            base, spec, variant, budget, video, folder, seed=seed, progress=progress
        )
    else:
        concept_file, seconds = trained
    pipe, adapter = X.concept_pipeline(base, concept_file)
    s = X.seeds(budget.samples, offset=100 * seed)
    recon = X.Job("recon", X.full_prompt(spec), seeds=s)
    edit = X.Job("edit_background", X.full_prompt(spec, X.edit_background(spec)), seeds=s)
    t0 = time.perf_counter()
    rec = summarize(
        X.score_job("recon", X.generate_videos(pipe, adapter, recon, world, budget), ref.video, targets, spec)
    )
    edit_videos = X.generate_videos(pipe, adapter, edit, world, budget)
    edit_scores = X.score_job("edit_background", edit_videos, ref.video, targets, spec)
    clip_values = {}
    if clip_scorer is not None:
        from sample.media import to_uint8

        text = edit.prompt
        for scores, video in zip(edit_scores, edit_videos, strict=True):
            scores["clip_t"] = clip_scorer(to_uint8(video), text)
        clip_values = clip_scorer.points(spec.name, text, ref.video, targets["edit_background"])
    ed = summarize(edit_scores)
    values = {
        "mse": rec["mse"]["mean"],
        "mse_floor": rec["mse_floor"]["mean"],
        "recon_motion_fidelity": rec["motion_fidelity"]["mean"],
        "recon_id_crop": rec["id_crop"]["mean"],
        "recon_trajectory_error": rec["trajectory_error"]["mean"],
        "centre_floor": rec["centre_floor"]["mean"],
        "id_crop_floor": rec["id_crop_floor"]["mean"],
        "reference_coherence": rec["reference_coherence"]["mean"],
        **clip_values,
    }
    ceiling = X.score_job("recon", [X.vae_roundtrip(pipe, ref.video)], ref.video, targets, spec)[0]
    keys = ("mse", "id_crop", "motion_fidelity", "temporal_coherence")
    values.update({f"vae_{k}": ceiling[k] for k in keys})
    for key in (
        "id_crop",
        "id",
        "edit_background",
        "temporal_coherence",
        "motion_fidelity",
        "trajectory_error",
        "clip_t",
    ):
        if key in ed:
            values[key] = ed[key]["mean"]
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
        "prompts": {"recon": recon.prompt, "edit": edit.prompt},
    }


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


def reusable(saved: dict | None, record: Path, concept: Path, budget, base_arg: str
             ) -> tuple[Path, float] | None:
    """(concept file, training seconds) of a saved run that differs from this budget only in how it samples
    (--guidance, --sample-steps, --samples), else None. The concept file must be older than the record:
    a newer one is from a later run that never finished."""
    if saved is None or saved.get("base") != base_arg or not concept.is_file():
        return None
    if X.training_budget(saved.get("budget", {})) != X.training_budget(budget):
        return None
    if concept.stat().st_mtime > record.stat().st_mtime:
        return None
    return concept, saved["train_seconds"]


def aggregate(records: list[dict], variants: list[X.Variant]) -> dict:
    """{variant: {metric: {"mean", "std", "n"}}} over (concept, seed) runs, plus the floors."""
    from toyworld.report import summarize

    table = {}
    for v in variants:
        mine = [r["values"] for r in records if r["variant"] == v.key]
        table[v.key] = summarize(mine) if mine else {}
    floors = summarize([{k: r["values"][f] for k, f in FLOORS.items() if f in r["values"]} for r in records])
    ceiling = summarize([{k: v for k, v in r["values"].items() if k.startswith("vae_")} for r in records])
    return {"rows": table, "floors": floors, "ceiling": ceiling}


def render_markdown(data: dict) -> str:
    from toyworld.report import fmt, fmt_pm, markdown_table

    b = data["budget"]
    header = ["method"] + [h for _, h, _ in COLUMNS] + ["train s"]
    rows = []
    for v in data["variants"]:
        row = data["table"]["rows"].get(v["key"], {})
        secs = [r["train_seconds"] for r in data["records"] if r["variant"] == v["key"]]
        rows.append(
            [v["label"]]
            + [fmt_pm(row.get(k)) if k in row or k != "clip_t" else NO_CLIP for k, _, _ in COLUMNS]
            + [fmt(sum(secs) / len(secs)) if secs else "n/a"]
        )
    floors = data["table"]["floors"]
    ceil = {k[4:]: v for k, v in data["table"].get("ceiling", {}).items()}
    rows.append(
        ["VAE round trip of the reference (ceiling)"]
        + [fmt(ceil[k.removeprefix("recon_")]["mean"]) if k.removeprefix("recon_") in ceil else "-"
           for k, _, _ in COLUMNS]
        + [""]
    )
    rows.append(
        ["floor (trivial answer)"]
        + [
            fmt(floors[k]["mean"])
            if k in floors
            else {
                "edit_background": "0.2 (chance)",
                "motion_fidelity": "0",
                "recon_motion_fidelity": "0",
                "id": "-",
            }.get(k, "-")
            for k, _, _ in COLUMNS
        ]
        + [""]
    )
    lines = [
        "# setseq bench toyworld: Tables 1-2 at toy scale",
        "",
        f"- base: `{data['base']}`"
        + (" (**random: smoke run, numbers meaningless**)" if data["random_base"] else ""),
        f"- concepts: {', '.join(data['concepts'])}; training seeds: {data['seeds']}; "
        f"{b['samples']} generations per prompt and run (guidance {b['guidance'] or 'base default'}, "
        f"{b['sample_steps'] or 'base default'} steps); mean ± spread (std) over concept x seed runs",
        f"- every row: {b['steps1']} + {b['steps2']} steps (single-stage rows: "
        f"{b['steps1'] + b['steps2']} steps on clips), batch {b['batch_size']}, LoRA lr {b['lr']:g} "
        f"(AdamW 0.9/0.99, wd 0.01, clip 0.05), token lr {b['token_lr']:g}; rank {b['rank']} (LoRA-1: 1) "
        f"on {X.describe_targets(b['targets'])}; "
        f"textual inversion: tokens only at lr {b['ti_token_lr']:g}",
        "- ours: B-dropout 0.8 / 0.5, prior preservation "
        f"({b['prior_count']} base generations of world captions, {b['prior_pairs']} with two objects, "
        f"{b['prior_per_batch']} per batch, "
        f"weight {b['prior_weight']:g}), "
        "token masking 0.1, caption dropout 0.1, self-conditioning 0.5; the other rows: none of these "
        "(self-conditioning kept)",
        "- MSE and the recon columns: the training prompt; the other columns: the background edit "
        f"(`{data['records'][0]['prompts']['edit'] if data['records'] else ''}`)",
        f"- wall time of this invocation: {data['seconds']:.0f} s; training time summed over runs: "
        f"{sum(r['train_seconds'] for r in data['records']):.0f} s",
        *([f"- NOT RUN ({len(data['missing'])} planned runs, tabulated without them): "
           + ", ".join(data["missing"])] if data.get("missing") else []),
        "",
        markdown_table(header, rows),
        "",
        "Floors: MSE of a flat video of the reference's background; crop cosine of the reference with its "
        "sprite flattened to its mean colour; chance 1/5 for the background; TC floor = the reference's "
        "own TC (coherence depends on the motion, higher is not always better); velocity correlation 0; "
        "C-T floor: the unedited reference with the edit prompt.",
        *clip_note(data["records"]),
    ]
    return "\n".join(lines)


def clip_note(records: list[dict]) -> list[str]:
    """The C-T column's model and its ceiling-like reference point, when it was measured."""
    scored = [r for r in records if "clip_t_target" in r["values"]]
    if not scored:
        return []
    target = sum(r["values"]["clip_t_target"] for r in scored) / len(scored)
    models = sorted({r.get("clip", "?") for r in scored})
    return [f"C-T: CLIP at {', '.join(models)}, raw cosine of the edit prompt (placeholders dropped) and the "
            f"mean frame embedding; the world's own rendering of the edit scores {target:.3g}."]


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm.auto import tqdm

    from setseq.cmd_demo import resolve_base_arg
    from toyworld.concepts import load_concept
    from toyworld.report import write_report
    from toyworld.world import ToyWorldConfig

    if args.suite == "compose":
        if args.clip is not None:
            raise ValueError("--clip belongs to `bench toyworld` (compose has no C-T column)")
        return run_compose(args)
    if args.pair is not None:
        raise ValueError("--pair belongs to `bench compose`; toyworld takes --concepts")
    start = time.perf_counter()
    args.seeds = 2 if args.seeds is None else args.seeds
    args.out = args.out or "runs/bench"
    budget = X.QUICK if args.quick else X.ToyBudget()
    budget = dataclasses.replace(
        budget,
        **budget_overrides(args),
    )
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1")
    variants = pick_variants(args.variants, budget)
    concepts = pick_concepts(args.concepts)
    out = Path(args.out)
    base_arg = resolve_base_arg(args.base, args.quick)
    base = X.ToyBase(base_arg, out / "work", seed=0)
    world = ToyWorldConfig()
    specs = {c: load_concept(c) for c in concepts}  # a bad name fails here, before any training
    concepts = [spec.name for spec in specs.values()]
    plan = [(spec, s, v) for spec in specs.values() for s in range(args.seeds) for v in variants]
    shard, shards = parse_shard(args.shard)
    missing: list[str] = []  # --table-only: planned runs with no saved record
    print(
        f"bench toyworld: {len(concepts)} concepts x {args.seeds} seeds x {len(variants)} variants = "
        f"{len(plan)} runs on base {base_arg}"
    )
    if args.clip is not None:
        from weights.clip import check_folder

        check_folder(args.clip)
    records, clip_scorer = [], None  # CLIP loads when the first run needs it
    for i, (spec, seed, variant) in enumerate(tqdm(plan, desc="bench runs", disable=not args.progress)):
        if i % shards != shard:
            continue
        name = spec.name
        path = out / "runs" / f"{name}-s{seed}-{variant.key}.json"
        folder = out / "work" / f"{name}-s{seed}-{variant.key}"
        saved = json.loads(path.read_text()) if path.is_file() and not args.fresh else None
        same_base = saved is not None and saved.get("base") == base_arg
        scored = args.clip is None or saved is not None and saved.get("clip") == str(args.clip)
        if same_base and scored and X.saved_budget(saved.get("budget", {})) == X.describe_budget(budget):
            records.append(saved)
            continue
        if args.table_only:
            missing.append(f"{name}-s{seed}-{variant.key}")
            continue
        trained = reusable(saved, path, folder / f"{variant.key}.safetensors", budget, base_arg)
        if clip_scorer is None and args.clip is not None:
            clip_scorer = EditClip(args.clip)
        rec = one_run(base, spec, variant, budget, world, folder, seed, args.progress, trained=trained,
                      clip_scorer=clip_scorer)
        rec.update(budget=X.describe_budget(budget), base=base_arg,
                   **({"clip": str(args.clip)} if args.clip is not None else {}))
        from toyworld.report import clean_json
        from weights.io import write_json_atomic

        write_json_atomic(path, clean_json(rec))  # an interrupted bench keeps every finished run
        records.append(json.loads(path.read_text()))
        print(
            f"  {name} seed {seed} {variant.key}: "
            + ", ".join(
                f"{k} {rec['values'][k]:.3g}"
                for k in ("mse", "id_crop", "edit_background", "motion_fidelity")
                if rec["values"].get(k) is not None
            )
            + (" (trained concept reused)" if trained else f" ({rec['train_seconds']:.0f} s training)")
        )
    data = {
        "command": "setseq bench toyworld",
        "base": base_arg,
        "random_base": base.random,
        "concepts": concepts,
        "seeds": args.seeds,
        "budget": X.describe_budget(budget),
        "variants": [
            {
                "key": v.key,
                "label": v.label,
                "overrides": {k: list(x) if isinstance(x, tuple) else x for k, x in v.overrides.items()},
            }
            for v in variants
        ],
        "table": aggregate(records, variants),
        "records": records,
        "seconds": time.perf_counter() - start,
        "missing": missing,
    }
    md, js = write_report(out, render_markdown(data), data, stem="bench")
    print(render_markdown(data).split("\n\n")[2])
    print(f"bench finished in {data['seconds']:.0f} s")
    print(f"table: {md}")
    print(f"json: {js}")
    return 0


def run_compose(args: argparse.Namespace) -> int:
    import dataclasses

    from setseq.cmd_demo import resolve_base_arg
    from toyworld import compose as C

    unused = [f"--{k}" for k in ("concepts", "variants", "shard") if getattr(args, k) not in (None, "3")]
    if unused:
        raise ValueError(f"{', '.join(unused)} belong to `bench toyworld`; compose takes --pair")
    budget = C.QUICK if args.quick else C.COMPOSE
    budget = dataclasses.replace(
        budget,
        **budget_overrides(args),
    )
    pair = C.pick_pair(args.pair)
    base_arg = resolve_base_arg(args.base, args.quick)
    data = C.bench_compose(base_arg, pair, 1 if args.seeds is None else args.seeds, budget,
                           Path(args.out or "runs/bench-compose"), fresh=args.fresh, progress=args.progress,
                           table_only=args.table_only)
    sections = C.render_markdown(data).split("\n\n")
    print("\n\n".join(sections[2:6]))
    print(f"bench compose finished in {data['seconds']:.0f} s")
    print(f"contact sheet: {data['paths']['sheet']}")
    print(f"table: {data['paths']['markdown']}")
    print(f"json: {data['paths']['json']}")
    return 0
