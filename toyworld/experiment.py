"""Toy-world experiments: personalize held-out concepts on the tiny base, generate, measure.

The pieces the demo, bench and compose experiments share: budgets, variants, the base, training one
concept, generating a job, scoring it (the prompts: toyworld/prompts.py; toyworld/demo.py, bench.py and
compose_bench.py put them together through toyworld/runner.py).

    concept spec ──render_concept──► reference clip (lossless mp4) ──personalize (variant)──► concept file
    concept file + base ──Pipeline──► several seeds per prompt ──pixels──► scores beside floors

Prompts follow the world's own caption template, with the concept tokens in the colour and motion
slots: stage 1 "a [v] square on a gray background", stage 2 "a [v] square moves [u] on a gray
background"; edits change the background word or add "and a red square moves up" as the world's
two-object captions do. Prior preservation uses the world's captions too ("STATIC | FULL").
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lora.inject import DEFAULT_TARGETS
from toyworld.concepts import ConceptSpec as ToyConcept
from toyworld.concepts import render_concept
from toyworld.prompts import (
    EXTRA,
    edit_background,
    full_prompt,
    static_prompt,
    toy_captions,
    toy_companion_prompts,
    toy_prior_prompts,
)
from toyworld.world import BACKGROUNDS, COLOURS, ToyWorldConfig
from train.recipe import HEAD_TARGET, RECIPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "assets" / "tiny"
FPS = 8.0


# ------------------------------------------------------------------------------------------ budget

# The tiny base's recipe (train/recipe.py) is the one source of the toy budget's training defaults; its
# targets add the DiT's output head to the paper's (HEAD_TARGET: why).
TINY = RECIPES["tiny"]
TOY_TARGETS = TINY["targets"]


@dataclass
class ToyBudget:
    """Personalization and sampling settings of a toy run (the paper's lr 1e-4 is for an 11B model; the
    tiny base trains at 1e-3). Every variant of the bench uses the same steps, batch and LoRA learning
    rate."""

    # The paper trains its regularized method longer than the unregularized two-stage (600 + 900 against
    # 150 + 400 steps: "with dropout regularization, convergence is slower"). Here every row gets the same
    # steps. `setseq bench toyworld` on the committed base (3 concepts x 2 seeds) at 600 + 1200 against
    # --steps1 300 --steps2 600: `ours` gained on every column (MSE 0.019 -> 0.015, reconstruction crop
    # 0.73 -> 0.78, edit crop 0.21 -> 0.28, edit motion 0.35 -> 0.39), the demo concept's worst
    # reconstruction frame (`setseq demo --seed 0` / `--seed 1`) rose from 0.36 / 0.50 to 0.64 / 0.61, and
    # DB-LoRA overfit: its background edits reproduce the training clip (adherence 6/6 -> 0/6), as the
    # paper's high-rank LoRA does. 900 + 1800 added little (worst frame 0.66) and takes over 5 minutes a
    # concept.
    steps1: int = TINY["steps1"]
    steps2: int = TINY["steps2"]
    rank: int = TINY["rank"]
    lr: float = TINY["lr"]
    token_lr: float = TINY["token_lr"]  # [v]/[u] embeddings (paper: 1e-5: zero-initialized ones barely move)
    ti_token_lr: float = 1e-2  # textual inversion: the tokens are all it trains
    batch_size: int = TINY["batch_size"]
    prior_count: int = TINY["prior_count"]  # prior-preservation generations per stage
    prior_per_batch: int = TINY["prior_per_batch"]
    prior_pairs: int = 0  # of the prior_count prompts, how many have two objects (toy_prior_prompts)
    # loss = concept + prior_weight * prior. At 1 (equal total weight) the prior halved what the
    # concept learned: on three held-out concepts (seed 0, the 16k-step base) 0.25 lowered the
    # reconstruction's trajectory error from 5.2 to 2.6 px (checker_eight) and MSE from 0.090 to
    # 0.027 (stripes_stutter, the demo).
    prior_weight: float = TINY["prior_weight"]
    samples: int = 4  # generations (seeds) per prompt
    sample_steps: int | None = None  # None = the base's own (ModelConfig.sample_steps)
    # Sampling guidance of a personalized concept (None = the base's own, ModelConfig.guidance, now 1 for
    # tiny too). `setseq bench toyworld --guidance 1` against `--guidance 3` on the DiT-stage base (before
    # the layout stage), 3 concepts x 2 seeds: guidance 1 beat 3 for `ours` on MSE (0.026 vs 0.028),
    # reconstruction motion (0.93 vs 0.91) and edit crop ID (0.36 vs 0.33), tied on edit adherence (5/6)
    # and motion (0.45), and lifted every LoRA row's reconstruction.
    guidance: float | None = 1.0
    prior_steps: int | None = None
    frame_time_shift: float | None = TINY.get("frame_time_shift")  # stage 1's training shift (train.config)
    targets: tuple[str, ...] = TOY_TARGETS  # LoRA targets of every LoRA row (HEAD_TARGET: why the head)
    pair_layout: str = TINY["pair_layout"]  # stitched pairs in the world's two-object layout (train/pairs.py)
    pair_fit: str = "crop"  # how a clip fits its half of a stitched pair
    # Ordinary objects the base generates beside the concept (PersonalizeConfig.companion_prompts): the
    # concept's clip stitched beside each in the two-object layout, on stitch_prob of the steps. Off: on
    # the demo (two seeds) 8 companions + 4 two-object priors made the added object 4/8 (0/8 without)
    # but lowered the worst reconstruction and background-edit frames (docs/results.md).
    companions: int = 0
    # The concept's clip also repainted onto this many other backgrounds (toyworld/backgrounds.py; never the
    # edit's colour), as videos of the same concept sharing its tokens. 3 against 0, bench `ours` (3 concepts
    # x 2 seeds): background edit crop 0.28 -> 0.57, motion 0.39 -> 0.78 (up in all 6 runs), reconstruction
    # within its spread (docs/results.md); the demo's edit worst frame 0.21 / 0.26 -> 0.37 / 0.49.
    backgrounds: int = 3

    def __post_init__(self) -> None:
        for name in ("steps1", "steps2", "rank", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.backgrounds <= len(BACKGROUNDS) - 2:  # the clip's own and the edit's excluded
            raise ValueError(f"backgrounds must be 0 to {len(BACKGROUNDS) - 2}, got {self.backgrounds}")


# A smoke run: seconds on a random tiny base, every file written, numbers meaningless.
QUICK = ToyBudget(
    steps1=2,
    steps2=2,
    rank=2,
    batch_size=3,
    prior_count=2,
    prior_per_batch=1,
    samples=1,
    sample_steps=2,
    prior_steps=2,
)


# ------------------------------------------------------------------------------------------- the base


class ToyBase:
    """Loads fresh copies of the base (a run's LoRA and tokens change them in place) through
    weights.base.load_base: a folder's weights, or random weights for a preset name (smoke runs)."""

    def __init__(self, base: str | Path, work: Path, seed: int = 0, device: str = "cpu"):
        from weights.base import base_config

        self.arg, self.seed, self.work = str(base), seed, work
        self.device = device  # fp32 weights there; personalization on CUDA trains under bf16 autocast
        self.random = not Path(base).is_dir()
        self.cfg = base_config(base, random_weights=self.random)
        if self.random:  # room for the world's two-object captions, spelled by a small tokenizer
            t5 = dataclasses.replace(self.cfg.t5, max_length=max(self.cfg.t5.max_length, 64))
            self.cfg = dataclasses.replace(self.cfg, t5=t5)
        self._sp_path: Path | None = None

    def load(self):
        """A model.base.Base with fresh weights, carrying this runner's config."""
        from weights.base import load_base

        base = load_base(self.arg, device=self.device, dtype="fp32", tokenizer=self._tokenizer(),
                         random_weights=self.random, seed=self.seed)
        if self.random:  # a random DiT's zero head passes no gradient to the LoRA: randomize it as trained
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                weight = base.dit.head.head.weight
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.05)  # same on any device
        return dataclasses.replace(base, config=self.cfg)

    def _tokenizer(self) -> Path | None:
        """None: the folder's own. A random base ships none: one trained on the world's captions."""
        if self.random and self._sp_path is None:
            from model.tokenizer import train_tokenizer

            path = train_tokenizer(toy_captions(), self.work / "tokenizer.model", vocab_size=64)
            self._sp_path = Path(path)
        return self._sp_path

    def for_training(self):
        return self.load()

    def pipeline(self):
        """A sample.generate.Pipeline with fresh weights and no concept."""
        from sample.generate import Pipeline

        return Pipeline.of(self.load())


# ---------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A row of Tables 1-2: a name, what it is, and the PersonalizeConfig fields it sets."""

    key: str
    label: str
    overrides: dict = field(default_factory=dict)


NO_REG = dict(dropout1=0.0, dropout2=0.0, prior_count=0, token_mask_prob=0.0, caption_dropout=0.0)


def variants(budget: ToyBudget) -> dict[str, Variant]:
    """The bench's rows. Single-stage rows train A1 + B1 on clips with the full prompt for
    steps1 + steps2 steps (the same budget as the two stages: train_concepts)."""
    single = dict(stages=(1,), single_stage=True)
    rows = [
        Variant("lora1", "LoRA rank-1 (single stage)", {**NO_REG, **single, "rank": 1}),
        Variant("dblora", f"DB-LoRA rank-{budget.rank} (single stage)", {**NO_REG, **single}),
        Variant("twostage", "Two-stage, no regularization", dict(NO_REG)),
        Variant("ours", "Two-stage + regularization (ours)", {}),
        Variant(
            "textinv",
            "Textual inversion (tokens only)",
            {**NO_REG, **single, "train_lora": False, "token_lr": budget.ti_token_lr},
        ),
    ]
    return {v.key: v for v in rows}


def extra_variants(budget: ToyBudget) -> dict[str, Variant]:
    """Rows a bench runs only when named (--variants): ablations of ours, not the paper's table."""
    paper_targets = {"targets": DEFAULT_TARGETS}
    rows = [Variant("ours_nohead", "ours on the paper's targets only (no head LoRA)", paper_targets),
            no_prior(budget)]
    return {v.key: v for v in rows}


def every_variant(budget: ToyBudget) -> dict[str, Variant]:
    """The bench's rows and the ablations run when named."""
    return {**variants(budget), **extra_variants(budget)}


def no_prior(budget: ToyBudget) -> Variant:
    return Variant(
        "ours_noprior", "Two-stage + regularization, without prior preservation", {"prior_count": 0}
    )


# --------------------------------------------------------------------------------------- reference


def reference_clip(spec: ToyConcept, world: ToyWorldConfig, seed: int = 0):
    return render_concept(spec, seed=seed, cfg=world)[0]


def edit_targets(spec: ToyConcept, world: ToyWorldConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """What each edit should look like, rendered by the world: (T, H, W, 3) uint8."""
    return {
        "edit_background": render_concept(spec, seed=seed, cfg=world, background=edit_background(spec))[
            0
        ].video,
        "edit_object": render_concept(spec, seed=seed, cfg=world, extra=EXTRA)[0].video,
    }


def write_lossless(path: Path, frames: np.ndarray, fps: float = FPS) -> Path:
    """An mp4 that decodes to exactly these frames (H.264 RGB, crf 0): the training input."""
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(
        path,
        frames,
        plugin="FFMPEG",
        fps=fps,
        codec="libx264rgb",
        output_params=["-crf", "0"],
        pixelformat="rgb24",
        macro_block_size=1,
    )
    return path


# ---------------------------------------------------------------------------------------- training


def personalize(
    base: ToyBase,
    spec: ToyConcept,
    variant: Variant,
    budget: ToyBudget,
    video: Path,
    folder: Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, float]:
    """Train one concept with one variant into FOLDER/<variant>.safetensors; returns (path, seconds).
    A previous run's file and work folder there are replaced."""
    from toyworld.backgrounds import repainted_clips
    from train.config import ConceptSpec

    out = folder / f"{variant.key}.safetensors"
    clips = repainted_clips(spec, video, folder, budget.backgrounds, unseen=(edit_background(spec),))
    concepts = [ConceptSpec(video=str(path), prompt=static_prompt(spec, bg), motion_prompt="moves [u]",
                            full_prompt=full_prompt(spec, bg)) for bg, path in clips]
    companions = toy_companion_prompts(spec, budget.companions) if budget.companions else ()
    seconds = train_concepts(base, concepts, variant, budget, out, folder / f"{variant.key}.work",
                             name=spec.name, seed=seed, progress=progress, companion_prompts=companions)
    return out, seconds


def train_concepts(base: ToyBase, concepts: list, variant: Variant, budget: ToyBudget, out: Path, work: Path,
                   *, name: str, seed: int, progress: bool, **extra) -> float:
    """One personalization run of `concepts` (train.config.ConceptSpec; several train into one adapter,
    each budget step count and the rank multiplied by the number of distinct concepts, as
    train/recipe.per_concept_budget does: videos sharing a token are one)
    with `variant`'s settings into OUT; returns the training seconds. `extra`: further PersonalizeConfig
    fields (e.g. stitch_prob). WORK is replaced."""
    from sample.sampler import sample_latents
    from train.config import PersonalizeConfig, distinct_concepts
    from train.personalize import main

    shutil.rmtree(work, ignore_errors=True)
    n = distinct_concepts(concepts)
    values = dict(
        concepts=concepts,
        out=str(out),
        work_dir=str(work),
        name=name,
        seed=seed,
        steps1=n * budget.steps1,
        steps2=n * budget.steps2,
        rank=n * budget.rank,
        targets=budget.targets,
        lr=budget.lr,
        token_lr=budget.token_lr,
        batch_size=budget.batch_size,
        prior_count=budget.prior_count,
        prior_per_batch=budget.prior_per_batch,
        prior_weight=budget.prior_weight,
        prior_prompts=toy_prior_prompts(budget.prior_count, pairs=budget.prior_pairs),
        prior_steps=budget.prior_steps,
        frame_time_shift=budget.frame_time_shift,
        pair_layout=budget.pair_layout,
        pair_fit=budget.pair_fit,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        log_every=25,
        force=True,
        progress=progress,
        device=base.device,
    )
    values.update(extra)
    values.update(variant.overrides)
    if values.get("single_stage"):  # one stage takes both stages' steps
        values["steps1"] = n * (budget.steps1 + budget.steps2)
    if values["prior_count"] == 0:
        values["prior_per_batch"] = 0
    start = time.perf_counter()
    main(PersonalizeConfig(**values), base.for_training(), sample_fn=sample_latents)
    seconds = time.perf_counter() - start
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the concept file holds the result
    return seconds


# -------------------------------------------------------------------------------------- generation


@dataclass
class Job:
    """Videos to generate: one prompt at one pair of scales, one video per seed."""

    name: str
    prompt: str
    identity: float = 1.0
    motion: float = 1.0
    seeds: tuple[int, ...] = (0,)
    # The box each applied concept is confined to (lora/regions.py), in pipeline order; None: everywhere.
    regions: tuple[tuple[float, float, float, float] | None, ...] = ()


def generate_videos(
    pipe, adapter: str | None, job: Job, world: ToyWorldConfig, budget: ToyBudget
) -> list[Tensor]:
    """All seeds of a job in one batched sampling run (sample.generate.generate_batch): (3, T, H, W) in
    [-1, 1] each, a video independent of its batch and device."""
    from sample.generate import GenerateConfig, generate_batch, set_concept_scales

    if adapter is not None:
        set_concept_scales(pipe, adapter, job.identity, job.motion)
    regions = {name: box for name, box in zip(pipe.concepts, job.regions, strict=False) if box is not None}
    gen = GenerateConfig(frames=world.frames, size=(world.size, world.size), steps=budget.sample_steps,
                         guidance=budget.guidance, regions=regions)
    return generate_batch(pipe, job.prompt, gen, job.seeds)


def concept_pipeline(base: ToyBase, concept_file: Path):
    """A fresh pipeline with the concept applied; returns (pipeline, adapter name)."""
    from lora.concept import load_concept
    from sample.generate import add_concept

    pipe = base.pipeline()
    adapter = add_concept(pipe, load_concept(concept_file))
    return pipe, adapter


# ---------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def vae_roundtrip(pipe, frames: np.ndarray) -> Tensor:
    """The clip through the base's VAE and back, (3, T, H, W): the best any generation in this latent
    space can look (the ceiling beside the floors)."""
    from toyworld.world import to_model_video

    video = to_model_video(frames).to(pipe.device)
    return pipe.vae.decode(pipe.vae.encode(video))[0].float().cpu()


def score_job(
    job_kind: str,
    videos: list[Tensor],
    reference: np.ndarray,
    targets: dict[str, np.ndarray],
    spec: ToyConcept,
) -> list[dict[str, float]]:
    """Scores of each video of a job. job_kind: "recon" (or a stylization), "edit_background",
    "edit_object"."""
    from toyworld.report import score_concept_video, score_with_extra

    out = []
    for v in videos:
        if job_kind == "edit_object":
            out.append(
                score_with_extra(
                    v,
                    reference,
                    targets["edit_object"],
                    sprite_colours=spec.colours,
                    extra_rgb=COLOURS[EXTRA[0]],
                    extra_motion=EXTRA[2],
                    backgrounds=BACKGROUNDS,
                )
            )
        else:
            bg = edit_background(spec) if job_kind == "edit_background" else None
            out.append(
                score_concept_video(v, reference, backgrounds=BACKGROUNDS, colours=COLOURS, background=bg)
            )
    return out


def describe_targets(targets) -> str:
    """A LoRA target list in a report's words."""
    named = {DEFAULT_TARGETS[0]: "attention", DEFAULT_TARGETS[1]: "FFN", HEAD_TARGET: "output head"}
    return " + ".join(named.get(t, f"`{t}`") for t in targets)


def seeds(n: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(range(offset, offset + n))


def describe_budget(budget: ToyBudget) -> dict:
    """The budget as JSON keeps it (lists, not tuples), so a saved record compares equal."""
    return {**dataclasses.asdict(budget), "targets": list(budget.targets)}


# Budget fields that only change generation: a concept trained under one value serves every other.
SAMPLING_FIELDS = ("samples", "sample_steps", "guidance")


# What a field's absence from a saved record means, where that is not the field's default: records
# written before `targets` existed trained the paper's targets, without the head; before `pair_layout`,
# stitched pairs side by side; before `backgrounds`, the clip alone; before `frame_time_shift`, stage 1 at
# the clips' shift.
ABSENT_MEANS = {"targets": list(DEFAULT_TARGETS), "pair_layout": "side_by_side", "backgrounds": 0,
                "frame_time_shift": None}


def saved_budget(values: dict) -> dict:
    """A budget as a record saved it, with fields added since at their defaults (or ABSENT_MEANS): a
    new ToyBudget field's default must keep the behaviour the code had before the field existed."""
    return {**describe_budget(ToyBudget()), **ABSENT_MEANS, **values}


def training_budget(budget: ToyBudget | dict) -> dict:
    """The budget fields that shape a trained concept (all but SAMPLING_FIELDS)."""
    values = describe_budget(budget) if isinstance(budget, ToyBudget) else saved_budget(budget)
    return {k: v for k, v in values.items() if k not in SAMPLING_FIELDS}


def nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


__all__ = [
    "ToyBudget",
    "QUICK",
    "ToyBase",
    "Variant",
    "variants",
    "every_variant",
    "no_prior",
    "personalize",
    "Job",
    "generate_videos",
    "concept_pipeline",
    "score_job",
    "edit_targets",
    "reference_clip",
    "write_lossless",
]
