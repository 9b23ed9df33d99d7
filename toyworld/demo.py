"""The demo: the whole method end to end on the toy world, on a CPU, in minutes (`setseq demo`).

1. load the base; render the held-out concept's clip (the reference) from its spec
2. personalize it with both stages and every regularizer (ours), and once more without prior
   preservation (the ablation the background edit is measured against; ablation=False skips it)
3. generate several seeds of: reconstruction (the training prompt), edit 1 (another background),
   edit 2 (a red square moving up added), stylizations (identity 1 / motion 0 and identity 0.5 /
   motion 1), and the adapter switched off (the base model's floor)
4. write OUT/videos/*.mp4 + *.gif, OUT/contact_sheet.png (reference, edit targets and every result,
   frame by frame), OUT/report.md + OUT/report.json (metrics with their floors, goals checked)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toyworld import experiment as X
from toyworld import prompts as P
from toyworld.concepts import ConceptSpec
from toyworld.demo_report import render_markdown, report_data
from toyworld.runner import Generated, ceiling, generate_jobs, resolve_base_arg
from toyworld.world import HALVES, Clip, ToyWorldConfig

# The one shipped concept the committed tiny VAE can carry: its encode-decode round trip of the clip
# beats the MSE floor with a 1.4 px trajectory error; checker_eight's and split_hop_spin's round trips
# are already above their MSE floors (the demo report prints this ceiling beside every number).
DEFAULT_CONCEPT = "stripes_stutter"


@dataclass(frozen=True)
class DemoSettings:
    """What a demo runs: the base (None: the committed tiny base), the concept, where results go, and
    the ToyBudget fields that change the default (or, with quick, the smoke) budget."""

    base: str | None = None
    concept: str = DEFAULT_CONCEPT
    out: Path = Path("runs/demo")
    quick: bool = False
    budget: Mapping = field(default_factory=dict)
    seed: int = 0  # training seed
    ablation: bool = True  # also train without prior preservation
    device: str = "cpu"  # cuda: personalization trains under bf16 autocast, sampling stays fp32
    progress: bool = True

    def __post_init__(self) -> None:
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: torch sees no CUDA device here; use --device cpu")
        self.toy_budget()  # a bad budget field fails here, before any work

    def toy_budget(self) -> X.ToyBudget:
        return dataclasses.replace(X.QUICK if self.quick else X.ToyBudget(), **self.budget)


# (run, kind, job): kind is how a job's videos are scored (experiment.score_job)
DemoJob = tuple[str, str, X.Job]


def demo_jobs(spec, budget: X.ToyBudget) -> list[DemoJob]:
    """What the demo generates with each trained concept."""
    s = X.seeds(budget.samples)
    recon = P.full_prompt(spec)
    edit_bg = P.full_prompt(spec, P.edit_background(spec))
    ours = [
        ("ours", "recon", X.Job("recon", recon, seeds=s)),
        ("ours", "edit_background", X.Job("edit_background", edit_bg, seeds=s)),
        ("ours", "edit_object", X.Job("edit_object", P.full_prompt(spec, extra=P.EXTRA), seeds=s)),
        # the same edit with the concept confined to the half the base puts it in (lora/regions.py)
        ("ours", "edit_object", X.Job("edit_object_region", P.full_prompt(spec, extra=P.EXTRA), seeds=s,
                                      regions=(HALVES[0],))),
        ("ours", "recon", X.Job("style_identity_only", recon, identity=1.0, motion=0.0, seeds=s)),
        ("ours", "recon", X.Job("style_half_identity", recon, identity=0.5, motion=1.0, seeds=s)),
        ("ours", "recon", X.Job("base_adapter_off", recon, identity=0.0, motion=0.0, seeds=s)),
    ]
    ablation = [(r.replace("ours", "ours_noprior"), k, j) for r, k, j in ours[:2]]
    return ours + ablation


@dataclass
class Scene:
    """What every stage reads: the settings, budget, concept, base, world, reference clip and edit targets."""

    settings: DemoSettings
    budget: X.ToyBudget
    spec: ConceptSpec
    base_arg: str
    base: X.ToyBase
    world: ToyWorldConfig
    ref: Clip  # the reference clip (.video: (T, H, W, 3) uint8)
    targets: dict[str, np.ndarray]  # what each edit should look like

    @property
    def videos_dir(self) -> Path:
        return self.settings.out / "videos"

    def write_video(self, stem: str, video) -> list[Path]:
        from sample import media

        return [media.write_mp4(self.videos_dir / f"{stem}.mp4", video, X.FPS),
                media.write_gif(self.videos_dir / f"{stem}.gif", video, X.FPS)]

    def score(self, kind: str):
        return lambda job, videos: X.score_job(kind, videos, self.ref.video, self.targets, self.spec)


def load(s: DemoSettings) -> Scene:
    """Stage 1: the base, the concept's reference clip and the edits' targets."""
    from toyworld.concepts import load_concept

    spec = load_concept(s.concept)
    base_arg = resolve_base_arg(s.base, s.quick)
    print(f"[1/4] base {base_arg}; concept {spec.name}: {spec.description or spec.pattern}")
    base = X.ToyBase(base_arg, s.out / "work", seed=s.seed, device=s.device)
    if base.random:
        print("      (a random base: the numbers below measure nothing but the machinery)")
    world = ToyWorldConfig()
    return Scene(s, s.toy_budget(), spec, base_arg, base, world, X.reference_clip(spec, world),
                 X.edit_targets(spec, world))


def personalize(scene: Scene) -> tuple[dict[str, Path], dict[str, float]]:
    """Stage 2: ours (and the no-prior ablation); concept files and training seconds per run."""
    s, budget = scene.settings, scene.budget
    work = s.out / "work"
    train_video = X.write_lossless(work / "reference.mp4", scene.ref.video)
    runs = [X.variants(budget)["ours"]] + ([X.no_prior(budget)] if s.ablation else [])
    files, seconds = {}, {}
    for i, variant in enumerate(runs):
        print(f"[2/4] personalize ({i + 1}/{len(runs)}) {variant.label}: {budget.steps1} + {budget.steps2} "
              f"steps, rank {budget.rank}, lr {budget.lr:g}")
        files[variant.key], seconds[variant.key] = X.personalize(
            scene.base, scene.spec, variant, budget, train_video, work, seed=s.seed, progress=s.progress)
    return files, seconds


def generate(scene: Scene, files: dict[str, Path]) -> list[tuple[str, str, Generated]]:
    """Stage 3: every job of every trained run, and first the VAE's ceiling: (run, kind, generated)."""
    from tqdm.auto import tqdm

    jobs = [j for j in demo_jobs(scene.spec, scene.budget) if j[0] in files]
    print(f"[3/4] generate {len(jobs)} prompts x {scene.budget.samples} seeds")
    pipes, results = {}, []
    for run, kind, job in tqdm(jobs, desc="generate", disable=not scene.settings.progress):
        if run not in pipes:
            pipes[run] = X.concept_pipeline(scene.base, files[run])
        pipe, adapter = pipes[run]
        [done] = generate_jobs(pipe, adapter, [job], scene.world, scene.budget, scene.score(kind))
        results.append((run, kind, done))
    first_pipe = next(iter(pipes.values()))[0]
    return [("ceiling", "recon", ceiling(first_pipe, scene.ref.video, scene.score("recon")))] + results


def contact_sheet(scene: Scene, results: list[tuple[str, str, Generated]]) -> Path:
    """The reference, the edits' targets, then every generated video, one row each."""
    from sample import media

    rows = [scene.ref.video, scene.targets["edit_background"], scene.targets["edit_object"]]
    labels = ["reference (the concept's clip)",
              f"target of edit 1: {P.edit_background(scene.spec)} background",
              "target of edit 2: + red square moving up"]
    for run, _, g in results:
        for seed, v in zip(g.job.seeds, g.videos, strict=True):
            rows.append(v)
            labels.append(f"{run} {g.job.name} a{g.job.identity:g} b{g.job.motion:g} seed {seed}")
    return media.write_contact_sheet(scene.settings.out / "contact_sheet.png", rows, labels)


def write_videos(scene: Scene, results: list[tuple[str, str, Generated]]) -> list[Path]:
    """OUT/videos/: the reference, every generated video and the VAE round trip, as mp4 and gif."""
    written = scene.write_video("reference", scene.ref.video)
    for run, _, g in results:
        for seed, v in zip(g.job.seeds, g.videos, strict=True):
            stem = "vae_roundtrip" if run == "ceiling" else f"{run}-{g.job.name}-s{seed}"
            written += scene.write_video(stem, v)
    return written


def run(s: DemoSettings) -> dict:
    """The demo S asks for; its report data, with the paths it wrote ('paths') and the count of videos."""
    from toyworld.report import write_report

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    scene = load(s)
    t_load = time.perf_counter() - start
    files, train_seconds = personalize(scene)
    gen_start = time.perf_counter()
    results = generate(scene, files)
    written = write_videos(scene, results)
    t_gen = time.perf_counter() - gen_start  # generation and its videos written
    print("[4/4] contact sheet and report")
    sheet = contact_sheet(scene, results)
    timing = {"load_and_render_s": t_load, "personalize_s": train_seconds, "generate_s": t_gen,
              "total_s": time.perf_counter() - start}
    data = report_data(scene, results, timing, files)
    md, js = write_report(s.out, render_markdown(data), data)
    timing["total_s"] = time.perf_counter() - start
    data["paths"] = {"videos": str(scene.videos_dir), "videos_written": len(written), "sheet": str(sheet),
                     "markdown": str(md), "json": str(js)}
    return data


def summary(data: dict) -> str:
    """What `setseq demo` prints when it is done: the time, then where the results are, the report last."""
    t, p = data["timing"], data["paths"]
    return "\n".join([
        f"demo finished in {t['total_s']:.0f} s "
        f"(personalize {sum(t['personalize_s'].values()):.0f} s, generate {t['generate_s']:.0f} s)",
        f"videos: {p['videos']}/ ({p['videos_written']} files: mp4 + gif per video)",
        f"contact sheet: {p['sheet']}",
        f"report: {p['markdown']} and {p['json']}",
    ])


__all__ = ["DEFAULT_CONCEPT", "DemoSettings", "demo_jobs", "run", "summary"]
