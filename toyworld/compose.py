"""Composition of two dynamic concepts at toy scale: the methods, prompts, target, measures and one run
behind `setseq bench compose` (toyworld/compose_bench.py runs them, compose_report.py reports them).

Three ways to put held-out concepts A and B in one video (paper §5.2.2 and the design notes):

    joint+stitch  one personalization run, both concepts in one adapter (one shared identity basis,
                  tokens [v1]/[u1] and [v2]/[u2]), plus stitched pairs in the base's two-object layout
                  (stitch_prob 0.5, the tiny recipe's) as the regularizer against identity leakage
    joint         the same run without stitched pairs (stitch_prob 0)
    post-hoc      A and B personalized separately (one adapter each, distinct tokens), both adapters
                  applied at generation (their weight deltas add)

Every run uses the `ours` variant of toyworld/experiment.py (both stages, every regularizer; each concept
on its clip and its repaints onto 3 other backgrounds, never the new scene's) at the same steps, batch and
learning rate per concept: a joint run of two concepts takes 2 x steps1 +
2 x steps2, the total that post-hoc's two single runs take; joint+stitch trains stage 2 STITCH_STAGE2
times as long (its stitched pairs take half the steps).

Generation: the composition in the world's two-object caption grammar, which puts the first-named
object in the left half (x < W/2) and the second in the right half,
"a [v1] square moves [u1] and a [v2] circle moves [u2] on a gray background", and each concept alone
with its own training prompt (for post-hoc also with its own adapter only: the single-concept baseline).

Measured from pixels, per half (the halves convention of sample/instruments.object_masks):

    id_crop / id_colour          appearance of the half's object against its own concept's reference
                                 (aligned-crop cosine; colour-histogram intersection)
    id_crop_other / id_colour_other   the same against the OTHER concept's reference: leakage
    crop_margin / colour_margin  own - other (> 0: the half looks more like its own concept)
    motion                       per-axis velocity correlation with the own reference trajectory,
                                 averaged over the axes the reference moves along (scale- and
                                 translation-free: a composed object moves in a smaller slot)
    sides_right                  both halves' crop margins > 0 (the concepts are where the prompt says)

Floors beside them: the flat-colour floor (the reference with its sprite flattened to its mean
colour), the base model without any concept prompted with the nearest vocabulary words, a flat video
(no object: ID 0); and the world's own rendering of the composition (with its VAE round trip) as the
ceiling. Shape alphabet: T frames, H, W pixels; frames (T, H, W, 3).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld import experiment as X
from toyworld import instruments as ins
from toyworld import prompts as P
from toyworld.backgrounds import repainted_clips
from toyworld.compose_scores import Reference, motion_match, score_alone, score_composition
from toyworld.concepts import ConceptSpec as ToyConcept
from toyworld.concepts import concept_path, list_concepts, slot_path
from toyworld.runner import generate_jobs
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    HALVES,
    MOTIONS,
    SHAPES,
    Layer,
    ToyWorldConfig,
    caption_of,
    draw_layers,
)
from train.recipe import pair_room

TOKENS = (("[v1]", "[u1]"), ("[v2]", "[u2]"))  # (appearance, motion) tokens of concept A, concept B
STITCH_PROB = X.TINY["stitch_prob"]  # the tiny recipe's: a stitched pair on half the steps
# joint+stitch trains stage 2 this much longer than the budget (1.5x): the stitched pairs take half the steps,
# and without more steps each concept alone lost its look (checker_eight's crop fell below its flat-colour
# floor in all 4 runs at 1x; 0.43-0.47, above it, at 1.5x). The share, not the steps, makes the composition:
# at 1.5x p 0.25 gives both right 0.92 / 0.75, margin +0.49, motion 0.59; p 0.5 1.00 / 1.00, +0.63, 0.68.
STITCH_STAGE2 = pair_room(STITCH_PROB)
# The new scene: the composition on a background neither clip has (toyworld/compose.scene_background); with
# repaints (--backgrounds) none of them shows it either, so it tests composing into a scene never trained.
SCENE_BACKGROUNDS = ("blue", "green", "brown")
MIN_MAX_LENGTH = 64  # T5 context here: a stitched pair's prompt is ~46 tokens on the tiny tokenizer

# The default: `ours` at 300 + 1200 steps per concept, so a joint run of two concepts trains 600 + 2400:
# stage 1 as one concept's, stage 2 twice one concept's 1200 (the paper: 2k-2.5k stage-2 steps for several
# concepts against 900 for one). Against 200 + 400 (`--pair checker_eight,split_hop_spin --variants
# joint+stitch`, seed 0) checker_eight alone rose from 0.29 to 0.46 crop (its flat-colour floor 0.42) and
# its right-slot margin from +0.12 to +0.31; a joint run takes ~8 minutes on 2 cores. 4 generations per
# prompt and order.
# Each concept also on its clip repainted onto 3 other backgrounds (the toy default; never the new scene's):
# over the protocol (3 pairs x 2 seeds) the compositions in a new scene rose from both right 0.12 / 0.25,
# margin +0.10, motion 0.19 to 0.50 / 0.58, +0.35, 0.39; in the stitched pairs' layout 1.00 / 1.00, +0.63,
# 0.68 -> 0.96 / 1.00, +0.60, 0.69; each concept alone crop 0.65 -> 0.60, motion 0.87 -> 0.84 (run spreads
# 0.07 / 0.03). `--backgrounds 0`: each pair on its two clips alone.
# A joint run's adapter has one concept's rank per concept (X.train_concepts; 2 x 16): at one concept's rank
# the concepts shared 16, and a weak one (checker_eight) took the other's look in the new scene. Over the
# protocol the new scene's both right rose from 0.50 / 0.58 to 0.88 / 0.96, margin +0.35 -> +0.53, motion
# 0.39 -> 0.61; the layout's margin +0.60 -> +0.71, motion 0.69 -> 0.79; each concept alone crop 0.60 ->
# 0.71, motion 0.84 -> 0.94 (up in all 6 runs; checker_eight alone back above its flat-colour floor).
# Compositions sample at guidance 2 (single concepts stay at 1): the prompt's background word then wins over
# the backgrounds the clips showed. Over the protocol (the same trained concepts resampled) the new scene's
# both right rose 0.88 / 0.96 -> 1.00 / 1.00 on the shipped pairs (margin +0.55 -> +0.59, motion 0.58 ->
# 0.63) and 0.79 / 0.88 -> 0.88 / 0.96 on the unseen ones (background right 0.92 -> 1.00); the layout moved
# by 0.01 at most, each concept alone's crop and motion by -0.01 (shipped) / +-0.01 (unseen).
COMPOSE = X.ToyBudget(steps1=300, steps2=1200, samples=4, guidance=2.0)
# The smoke run: the experiment's QUICK with 6 stage-2 steps, so that a joint run (2 x 2 + 2 x 6 steps)
# draws a stitched pair at least once at seed 0 (at 2 + 2 it happens to draw none: 0.75^8 = 10%).
QUICK = dataclasses.replace(X.QUICK, steps2=6, backgrounds=0, guidance=COMPOSE.guidance)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    joint: bool  # one run for both concepts (else two single runs mixed at generation)
    stitch_prob: float = 0.0
    layout: str | None = None  # stitched pairs' layout (train/pairs.py); None = the base's (the budget's)
    fit: str = "crop"  # how each clip fits its half
    stage2: float = 1.0  # stage-2 steps as a multiple of the budget's
    regions: bool = False  # two single runs, each confined to its object's half (lora/regions.py)
    variant: str = "ours"  # the toyworld bench row each run trains (toyworld/experiment.variants)


METHODS = (
    Method("joint+stitch", f"joint, stitched pairs in the base's layout (p {STITCH_PROB:g}, stage 2 x"
           f"{STITCH_STAGE2:g})", True, STITCH_PROB, stage2=STITCH_STAGE2),
    Method("joint", "joint, no stitched pairs", True, 0.0),
    Method("post-hoc", "post-hoc mix of two single runs", False),
)
# Run when named (--variants): the other stitching geometries, measured against the default's crop, and
# the regional baseline: the two single runs, each adapter confined to its half at sampling.
EXTRA_METHODS = (
    Method("joint+stitch-sbs", f"joint, side-by-side 64x128 pairs, 'On the left, ...' (p {STITCH_PROB:g})",
           True, STITCH_PROB, layout="side_by_side"),
    Method("joint+stitch-squeeze", f"joint, pairs squeezed into halves (p {STITCH_PROB:g})", True,
           STITCH_PROB, fit="squeeze"),
    Method("joint+stitch-scale", f"joint, pairs at half size in halves (p {STITCH_PROB:g})", True,
           STITCH_PROB, fit="scale"),
    Method("post-hoc+regions", "post-hoc mix, each concept confined to its half", False, regions=True),
)


def bench_row(key: str) -> Method | None:
    """'ROW+stitch': the joint default trained as another toyworld bench row (dblora, twostage,
    ours_noprior, ...: which part of `ours` a composition needs); None if not that form."""
    m = re.fullmatch(r"(\w+)\+stitch", key)
    rows = X.every_variant(X.ToyBudget())
    if m is None or m[1] not in rows or m[1] == "ours":
        return None
    return Method(key, f"{rows[m[1]].label}, joint, stitched pairs (p {STITCH_PROB:g}, stage 2 x"
                  f"{STITCH_STAGE2:g})", True, STITCH_PROB, stage2=STITCH_STAGE2, variant=m[1])


def stitched_share(key: str) -> Method | None:
    """'joint+stitch-pNN': joint+stitch with stitched pairs on NN% of the steps (None if not that form)."""
    share = re.fullmatch(r"joint\+stitch-p(\d{1,3})", key)
    if share is None or int(share[1]) > 100:
        return None
    p = int(share[1]) / 100
    return Method(key, f"joint, stitched pairs in the base's layout (p {p:g})", True, p)


def pick_methods(text: str | None) -> tuple[Method, ...]:
    """--variants for compose: method keys, comma-separated (default METHODS)."""
    if text is None:
        return METHODS
    table = {m.key: m for m in METHODS + EXTRA_METHODS}
    keys = [k.strip() for k in text.split(",") if k.strip()]
    for k in keys:
        if k not in table and (made := stitched_share(k) or bench_row(k)):
            table[k] = made
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise ValueError(f"--variants {text!r}: unknown {unknown or 'empty'}; compose methods: "
                         f"{', '.join(table)}, joint+stitch-pNN (stitched pairs on NN% of the steps), "
                         "ROW+stitch (the joint default as another bench row: dblora, twostage, ...)")
    return tuple(table[k] for k in keys)


def pick_pair(text: str | None) -> tuple[str, str]:
    """'a,b' (shipped names or TOML paths) or None (the first two shipped concepts, alphabetically)."""
    names = list_concepts()
    if text is None:
        return names[0], names[1]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--pair {text!r}: give two concepts separated by a comma, e.g. "
                         f"--pair {names[0]},{names[1]} (shipped: {', '.join(names)})")
    if parts[0] == parts[1]:
        raise ValueError(f"--pair {text!r}: the two concepts must differ (shipped: {', '.join(names)})")
    unknown = [p for p in parts if p not in names and not p.endswith(".toml")]
    if unknown:
        raise ValueError(f"--pair {text!r}: unknown concept(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(names)} or give TOML files")
    return parts[0], parts[1]


def pick_pairs(text: str | None) -> list[tuple[str, str]]:
    """'all' (every unordered pair of the shipped concepts), 'a,b;c,d', or one 'a,b' (pick_pair)."""
    if text == "all":
        names = list_concepts()
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return [pick_pair(p) for p in (text.split(";") if text else [None])]


# ------------------------------------------------------------------------------------------ prompts


def with_tokens(prompt: str, k: int) -> str:
    """An experiment prompt with concept k's own tokens in place of [v] / [u]."""
    return prompt.replace("[v]", TOKENS[k][0]).replace("[u]", TOKENS[k][1])


def composition_prompt(a: ToyConcept, b: ToyConcept, swapped: bool = False, background: str | None = None
                       ) -> str:
    """The world's two-object caption with concept tokens: A named first (left half), B second (right);
    swapped: B first (left), A second, on B's background (a stitched pair keeps its left clip's), or on
    `background` (a new scene)."""
    left, right = ((b, 1), (a, 0)) if swapped else ((a, 0), (b, 1))
    first, second = (f"a {TOKENS[k][0]} {spec.shape} moves {TOKENS[k][1]}" for spec, k in (left, right))
    return f"{first} and {second} on a {background or left[0].background} background"


def scene_background(a: ToyConcept, b: ToyConcept) -> str:
    """The new scene's background: one neither concept's clip has and no repaint shows (blue if free)."""
    return next(bg for bg in SCENE_BACKGROUNDS if bg not in (a.background, b.background))


def nearest_words(spec: ToyConcept, world: ToyWorldConfig, exclude: tuple[str, ...] = ()
                  ) -> tuple[str, str, str]:
    """(colour, shape, motion) vocabulary words nearest the concept: the colour name nearest either
    of its two colours (none in `exclude`: two objects of a world caption never share a colour), its
    shape, and the vocabulary motion whose frame-to-frame steps point most the same way as its own
    (cosine of the stacked step vectors: unlike a correlation it credits a steady "moves right" for
    a stutter to the right)."""
    names = [n for n in COLOURS if n not in exclude]
    dist = {n: min(float(np.linalg.norm(np.subtract(COLOURS[n], c))) for c in spec.colours) for n in names}
    ref = np.diff(concept_path(spec, world)[0], axis=0).ravel()

    def agreement(motion: str) -> float:
        steps = np.diff(concept_path(spec, world, motion=motion)[0], axis=0).ravel()
        norm = np.linalg.norm(steps) * np.linalg.norm(ref)
        return float(steps @ ref / norm) if norm > 0 else 0.0

    return min(dist, key=dist.get), spec.shape, max(MOTIONS, key=agreement)


# ------------------------------------------------------------------------------------------- target


def render_pair(a: ToyConcept, b: ToyConcept, world: ToyWorldConfig, background: str | None = None
                ) -> np.ndarray:
    """What the composition should look like, (T, H, W, 3) uint8: A in the left slot (x = W/4), B in the
    right (x = 3W/4), each on its own path with the x offsets shrunk to keep the sprite in its half; on
    A's background or `background`."""
    layers = []
    for spec, slot in ((a, world.size / 4), (b, 3 * world.size / 4)):
        centres, angles = slot_path(spec, world, slot)
        layers.append(Layer(centres=centres[None], shapes=np.array([SHAPES.index(spec.shape)]),
                            colours=np.array(spec.colours, np.uint8)[None], radius=spec.radius,
                            pattern=spec.pattern, cell=spec.cell, angles=angles[None]))
    bg = np.array(BACKGROUNDS[background or a.background], np.uint8)[None]
    return draw_layers(bg, layers, world.frames, world.size)[0][0]


# ---------------------------------------------------------------------------------------- training


def widen_context(base: X.ToyBase) -> X.ToyBase:
    """Room for a stitched pair's prompt ("On the left, ... On the right, ..."): the tokenizer pads
    to the config's T5 max_length, which weights do not depend on (relative positions; padding is
    masked), so every method here runs at the same, longer context."""
    t5 = base.cfg.t5
    if t5.max_length < MIN_MAX_LENGTH:
        base.cfg = dataclasses.replace(base.cfg, t5=dataclasses.replace(t5, max_length=MIN_MAX_LENGTH))
    return base


def train(base: X.ToyBase, specs: list[tuple[int, ToyConcept, Path]], budget: X.ToyBudget, out: Path,
          work: Path, *, seed: int, stitch_prob: float, progress: bool, layout: str | None = None,
          fit: str = "crop", variant: str = "ours", scene: str) -> float:
    """One personalization run (a toyworld bench row) of one or several concepts into one concept file;
    specs: (token slot k, concept, its reference video), each also repainted onto budget.backgrounds
    others, never the new scene's. Steps scale with the number of concepts. Returns the training seconds."""
    from train.config import ConceptSpec

    concepts = [ConceptSpec(video=str(path), prompt=with_tokens(P.static_prompt(spec, bg), k),
                            motion_prompt=f"moves {TOKENS[k][1]}", token=TOKENS[k][0],
                            motion_token=TOKENS[k][1], full_prompt=with_tokens(P.full_prompt(spec, bg), k))
                for k, spec, video in specs
                for bg, path in repainted_clips(spec, video, work.parent / "clips", budget.backgrounds,
                                                  unseen=(scene,))]
    return X.train_concepts(base, concepts, X.every_variant(budget)[variant], budget, out, work,
                            name="__".join(s.name for _, s, _ in specs), seed=seed, progress=progress,
                            stitch_prob=stitch_prob, pair_layout=layout or budget.pair_layout, pair_fit=fit)


def pipeline_with(base: X.ToyBase, files: list[Path]):
    """A fresh pipeline with every concept file applied (each its own adapter, scales 1)."""
    from lora.concept import load_concept
    from sample.generate import add_concept

    pipe = base.pipeline()
    for f in files:
        add_concept(pipe, load_concept(f))
    return pipe


# ---------------------------------------------------------------------------------------- one run


@dataclass
class Pair:
    """Everything about the pair a run needs: specs, reference clips and their videos on disk."""

    a: ToyConcept
    b: ToyConcept
    world: ToyWorldConfig
    ref_a: np.ndarray  # (T, H, W, 3) uint8
    ref_b: np.ndarray
    video_a: Path
    video_b: Path

    @classmethod
    def make(cls, a: ToyConcept, b: ToyConcept, world: ToyWorldConfig, work: Path) -> Pair:
        ref_a, ref_b = X.reference_clip(a, world).video, X.reference_clip(b, world).video
        return cls(a, b, world, ref_a, ref_b, X.write_lossless(work / f"{a.name}.mp4", ref_a),
                   X.write_lossless(work / f"{b.name}.mp4", ref_b))

    def refs(self) -> tuple[Reference, Reference]:
        return Reference.of(self.ref_a), Reference.of(self.ref_b)

    @property
    def scene(self) -> str:
        return scene_background(self.a, self.b)

    def jobs(self, samples: tuple[int, ...], regions: bool = False) -> dict[str, X.Job]:
        """The compositions as stitched pairs show them and in the new scene, both orders; each concept
        alone. regions: A's adapter (applied first) confined to A's half, B's to B's, in compositions."""
        ab, ba = (HALVES, HALVES[::-1]) if regions else ((), ())

        def composition(name: str, swapped: bool, background: str | None) -> X.Job:
            prompt = composition_prompt(self.a, self.b, swapped, background)
            return X.Job(name, prompt, seeds=samples, regions=ba if swapped else ab)

        return {
            "compose": composition("compose", False, None),
            "compose_ba": composition("compose_ba", True, None),
            "scene": composition("scene", False, self.scene),
            "scene_ba": composition("scene_ba", True, self.scene),
            "alone_a": X.Job("alone_a", with_tokens(P.full_prompt(self.a), 0), seeds=samples),
            "alone_b": X.Job("alone_b", with_tokens(P.full_prompt(self.b), 1), seeds=samples),
        }


def first_frames(video) -> np.ndarray:
    """A generated video as a person sees it: (T, H, W, 3) uint8."""
    return np.clip(np.round(ins.as_frames(video)), 0, 255).astype(np.uint8)


def scorer(pair: Pair):
    """Scores of a job's videos: a composition per half; a concept alone (jobs named *_a for A, else B)
    against its own reference and the other's."""
    ref_a, ref_b = pair.refs()

    def score(job: X.Job, videos) -> list[dict[str, float]]:
        if job.name.startswith(("compose", "scene")):
            bg = pair.scene if job.name.startswith("scene") else None
            return [score_composition(v, ref_a, ref_b, swapped=job.name.endswith("_ba"), background=bg)
                    for v in videos]
        own, other = (ref_a, ref_b) if job.name.endswith("_a") else (ref_b, ref_a)
        return [score_alone(v, own, other) for v in videos]

    return score


def generate_and_score(pipe, jobs: dict[str, X.Job], pair: Pair, budget: X.ToyBudget
                       ) -> tuple[dict[str, list[dict]], dict[str, np.ndarray]]:
    """Scores per job (one dict per video) and the first video of each job (uint8, for the sheet)."""
    done = generate_jobs(pipe, None, list(jobs.values()), pair.world, budget, scorer(pair))
    named = list(zip(jobs, done, strict=True))
    return {name: g.scores for name, g in named}, {name: first_frames(g.videos[0]) for name, g in named}


def concept_files(method: Method, pair: Pair, work: Path) -> list[Path]:
    """The concept files a run of METHOD trains into WORK: one joint file, or one per concept."""
    if method.joint:
        return [work / "joint.safetensors"]
    return [work / f"single-{spec.name}.safetensors" for spec in (pair.a, pair.b)]


def run_method(base: X.ToyBase, method: Method, pair: Pair, budget: X.ToyBudget, work: Path, seed: int,
               progress: bool, trained: dict[str, float] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Train (one joint run, or two single runs), generate the composition and each concept alone,
    score: one record and the first video of each job. trained: the training seconds of each run whose
    concept file WORK already holds (a rerun that only samples differently): nothing is trained."""
    specs = [(0, pair.a, pair.video_a), (1, pair.b, pair.video_b)]
    files = concept_files(method, pair, work)
    if trained is not None:
        seconds = dict(trained)
    elif method.joint:
        steps = dataclasses.replace(budget, steps2=round(budget.steps2 * method.stage2))
        seconds = {"joint": train(base, specs, steps, files[0], work / "joint.work", seed=seed,
                                  stitch_prob=method.stitch_prob, progress=progress, layout=method.layout,
                                  fit=method.fit, variant=method.variant, scene=pair.scene)}
    else:
        seconds = {spec.name: train(base, [(k, spec, video)], budget, f, work / f"{f.stem}.work", seed=seed,
                                    stitch_prob=0.0, progress=progress, variant=method.variant,
                                    scene=pair.scene)
                   for (k, spec, video), f in zip(specs, files, strict=True)}
    t0 = time.perf_counter()
    jobs = pair.jobs(X.seeds(budget.samples, offset=100 * seed), regions=method.regions)
    scores, firsts = generate_and_score(pipeline_with(base, files), jobs, pair, budget)
    if not method.joint:  # the single-concept baseline: each concept with its own adapter only
        for f, key in zip(files, ("alone_a", "alone_b"), strict=True):
            job = {f"single_{key[-1]}": jobs[key]}
            s, v = generate_and_score(pipeline_with(base, [f]), job, pair, budget)
            scores.update(s)
            firsts.update(v)
    record = {
        "method": method.key, "label": method.label, "seed": seed, "stitch_prob": method.stitch_prob,
        "layout": method.layout or budget.pair_layout, "fit": method.fit, "stage2": method.stage2,
        "train_seconds": sum(seconds.values()), "train_seconds_per_run": seconds,
        "generate_seconds": time.perf_counter() - t0, "prompts": {k: j.prompt for k, j in jobs.items()},
        "scores": scores, "concept_files": [str(f) for f in files],
    }
    return record, firsts


def floors(base: X.ToyBase, pair: Pair, budget: X.ToyBudget) -> tuple[dict, dict[str, np.ndarray]]:
    """The trivial answers: the base model (no concept) prompted with the nearest vocabulary words;
    the world's rendering of the composition and its VAE round trip (the ceiling); flat-colour floors."""
    from toyworld.report import flat_colour_floor

    ref_a, ref_b = pair.refs()
    wa = nearest_words(pair.a, pair.world)
    wb = nearest_words(pair.b, pair.world, exclude=(wa[0],))
    samples = X.seeds(budget.samples, offset=10_000)
    jobs = {
        "compose": X.Job("compose", caption_of(pair.a.background, [wa, wb]), seeds=samples),
        "compose_ba": X.Job("compose_ba", caption_of(pair.b.background, [wb, wa]), seeds=samples),
        "scene": X.Job("scene", caption_of(pair.scene, [wa, wb]), seeds=samples),
        "scene_ba": X.Job("scene_ba", caption_of(pair.scene, [wb, wa]), seeds=samples),
        "alone_a": X.Job("alone_a", caption_of(pair.a.background, [wa]), seeds=samples),
        "alone_b": X.Job("alone_b", caption_of(pair.b.background, [wb]), seeds=samples),
    }
    pipe = base.pipeline()
    scores, firsts = generate_and_score(pipe, jobs, pair, budget)
    target = render_pair(pair.a, pair.b, pair.world)
    roundtrip = X.vae_roundtrip(pipe, target)
    out = {
        "words": scores, "words_prompts": {k: j.prompt for k, j in jobs.items()},
        "target": score_composition(target, ref_a, ref_b),
        "target_vae": score_composition(roundtrip, ref_a, ref_b),
        "target_ba": score_composition(render_pair(pair.b, pair.a, pair.world), ref_a, ref_b, swapped=True),
        "target_scene": score_composition(render_pair(pair.a, pair.b, pair.world, pair.scene), ref_a, ref_b,
                                          background=pair.scene),
        "reference_a": score_alone(pair.ref_a, ref_a, ref_b),
        "reference_b": score_alone(pair.ref_b, ref_b, ref_a),
        "flat_colour_a": flat_colour_floor(ref_a.frames, ref_a.mask),
        "flat_colour_b": flat_colour_floor(ref_b.frames, ref_b.mask),
    }
    firsts = {f"words_{k}": v for k, v in firsts.items()}
    firsts["target"] = target
    firsts["target_vae"] = first_frames(roundtrip)
    return out, firsts


__all__ = ["METHODS", "EXTRA_METHODS", "STITCH_PROB", "STITCH_STAGE2", "pick_methods", "COMPOSE", "QUICK",
           "TOKENS", "pick_pair", "pick_pairs", "composition_prompt", "render_pair", "motion_match",
           "Reference", "score_composition", "score_alone", "run_method", "floors"]
