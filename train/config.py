"""What a personalization run is asked to do: the concepts (`ConceptSpec`) and every setting of the loop
(`PersonalizeConfig`), checked when built. The config goes into every checkpoint and concept file."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from lora.inject import DEFAULT_TARGETS

from .pairs import PairLayout, ordered_pairs
from .prior import DEFAULT_PROMPTS


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class ConceptSpec:
    """One video and its prompts. Several specs train into ONE adapter (one shared basis); specs that
    share token and motion_token are one concept seen in several videos."""

    video: str
    prompt: str  # static part: appearance + surroundings, holds `token`: "A [v] man in a cap on a bridge."
    motion_prompt: str = ""  # dynamic part, holds `motion_token`, e.g. "He is performing [u] dancing motion."
    token: str = "[v]"
    motion_token: str = "[u]"
    # The stage-2 text when the motion words belong inside the sentence ("a [v] sprite moving in [u]
    # motion on a gray background"); "" = prompt + " " + motion_prompt.
    full_prompt: str = ""

    def text(self, stage: int) -> str:
        """Stage 1: the static prompt; stage 2: static ∪ dynamic (paper eq. 7)."""
        if stage == 1:
            return self.prompt
        return self.full_prompt or f"{self.prompt.strip()} {self.motion_prompt.strip()}"


@dataclass
class PersonalizeConfig:
    concepts: list[ConceptSpec]
    out: str  # the concept file (.safetensors) written at the end
    name: str = "concept"  # concept (adapter) name inside the file
    work_dir: str | None = None  # checkpoints, latent caches, loss log, previews; None = "<out>.work"
    stages: tuple[int, ...] = (1, 2)
    steps1: int = 600  # paper: 600 (stage I), 900 (stage II), 2k-2.5k for complex or several concepts
    steps2: int = 900
    batch_size: int = 8  # items per step, prior-preservation items included
    rank: int = 32
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout1: float = 0.8  # B-dropout p, stage 1 / stage 2 (Table 6)
    dropout2: float = 0.5
    lr: float = 1e-4
    token_lr: float = 1e-5
    train_tokens: bool = True  # train the [v]/[u] input embeddings (start at zero); the paper: optional
    # Baselines of Tables 1-2: `single_stage` trains A1 and B1 in ONE stage on clips with the full
    # prompt and both tokens (LoRA-r, DB-LoRA; stages must be (1,)); `train_lora` False trains the
    # token embeddings alone (textual inversion; the adapter stays a zero no-op).
    single_stage: bool = False
    train_lora: bool = True
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 0.05
    caption_dropout: float = 0.1  # prompt -> "" so classifier-free guidance keeps working
    token_mask_prob: float = 0.1  # each encoded text token hidden with this probability
    self_cond_prob: float = 0.5  # when the DiT has self-conditioning
    time_shift: float | None = None  # training-time shift; None = the base model's sampling shift
    # The shift of a stage that trains on single frames (stage 1); None = time_shift's. A frame holds 1/T of
    # a clip's latent values, so at the clip's shift its times sit where a frame is already nearly decided
    # and its detail barely trains; SD3's resolution rule scales the shift by sqrt(values ratio): / sqrt(T).
    frame_time_shift: float | None = None
    prior_weight: float = 1.0  # loss = concept + prior_weight * prior
    prior_count: int = 4  # generations per stage (0 = no prior preservation)
    prior_per_batch: int = 2  # of batch_size
    prior_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    prior_steps: int | None = None  # sampler steps for the prior; None = the base model's default
    # Where stage 2 puts a concept's motion prompt: inside its static prompt, before the first occurrence of
    # this text (a base whose captions name the motion mid-sentence); "" = after it. A full_prompt wins.
    motion_before: str = ""
    stitch_prob: float = 0.25  # with several concepts: chance a step is a stitched pair
    # How the base shows two objects (train/pairs.py): "side_by_side" (natural-language bases, Wan) or
    # "halves" (the toy base's grammar and geometry); pair_fit: how a clip fits a half ("halves" only).
    pair_layout: str = "side_by_side"
    pair_fit: str = "crop"
    # Ordinary objects beside the concept: "STATIC | FULL" prompts the BASE generates once (no adapter);
    # each concept's clip is stitched beside each generation, both orders, with a two-object prompt, and
    # drawn among the stitched pairs (stitch_prob), so the concept's tokens learn to stay on their object.
    companion_prompts: tuple[str, ...] = ()
    frames: int | None = None  # clip length; None = the longest 1 + k * time_compression <= the video, max 81
    fps: float | None = None  # None = the video's own rate
    size: tuple[int, int] | None = None  # (H, W); None = the video's size cropped to a multiple
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    preview_every: int = 0  # 0 = no previews
    preview_steps: int = 20
    log_every: int = 10
    loss_bins: int = 5
    device: str = "cpu"
    grad_checkpointing: bool = False
    # Two-expert bases (Wan 2.2 A14B): which experts get the adapter. "both": each trains on the times it
    # serves (the batch splits at the boundary); "high" / "low": only that expert, on its times alone.
    expert: str = "both"
    compile: bool = False  # torch.compile each DiT block (H100, Wan 1.3B real size: step 2.83 -> 2.38 s)
    resume: bool = False
    force: bool = False  # overwrite an existing `out`
    progress: bool = True
    # Set by a resume, not by a user: each resume that changed a RESUME_FREE setting, as {"stage", "step",
    # "changed": {key: [then, now]}}; kept in checkpoints and in the concept file.
    resumed: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        # TOML and JSON hand lists and dicts; checkpoints compare the config as JSON, so normalize first.
        self.concepts = [c if isinstance(c, ConceptSpec) else ConceptSpec(**c) for c in self.concepts]
        self.stages = tuple(sorted(set(self.stages)))
        self.targets, self.betas = tuple(self.targets), tuple(self.betas)
        self.prior_prompts, self.companion_prompts = tuple(self.prior_prompts), tuple(self.companion_prompts)
        if self.size is not None:
            self.size = tuple(self.size)
        self._place_motion_words()
        self._validate()

    def _place_motion_words(self) -> None:
        for c in self.concepts:
            head, sep, tail = c.prompt.partition(self.motion_before or "\0")
            if sep and c.motion_prompt and not c.full_prompt:  # the motion words inside the sentence
                c.full_prompt = f"{head} {c.motion_prompt.strip()}{sep}{tail}"

    def _validate(self) -> None:
        require(bool(self.concepts), "no concept given: pass a VIDEO and its --prompt")
        require(self.stages and set(self.stages) <= {1, 2}, f"stages must be 1, 2 or both, got {self.stages}")
        require(not self.single_stage or self.stages == (1,),
                f"single_stage trains one stage on clips: set stages (1,), got {self.stages}")
        require(self.train_lora or self.train_tokens,
                "train_lora and train_tokens are both off: nothing to train")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.steps1 >= 1, f"steps1 must be >= 1, got {self.steps1}")
        require(self.steps2 >= 1, f"steps2 must be >= 1, got {self.steps2}")
        require(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        # Ranges of the numbers TOML can give (the flags check theirs while parsing): finite is checked there
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for name in ("token_lr", "prior_weight"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("time_shift", "frame_time_shift"):
            v = getattr(self, name)
            require(v is None or v > 0, f"{name} must be > 0 (or left out), got {v}")
        require(self.fps is None or self.fps > 0, f"fps must be > 0 (or left out: the video's own), "
                                                   f"got {self.fps}")
        require(self.prior_count == 0 or 0 < self.prior_per_batch < self.batch_size,
                f"prior_per_batch {self.prior_per_batch} must leave room in batch_size {self.batch_size} "
                "for concept items (or set prior_count 0)")
        for name in ("caption_dropout", "token_mask_prob", "self_cond_prob", "stitch_prob"):
            p = getattr(self, name)
            require(0.0 <= p <= 1.0, f"{name} must be a probability in [0, 1], got {p}")
        require(self.checkpoint_every >= 1 and self.log_every >= 1,
                "checkpoint_every, log_every must be >= 1")
        # Videos that share a token pair are one concept seen in several clips; a token may not be shared
        # otherwise (two concepts with one [v] could not be told apart).
        pairs = list(dict.fromkeys((c.token, c.motion_token) for c in self.concepts))
        tokens = [t for pair in pairs for t in pair]
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        require(not dup, f"tokens {dup} are used by more than one concept; give each concept its own, "
                         "e.g. token '[v1]' / motion_token '[u1]', '[v2]' / '[u2]' (several videos of one "
                         "concept share both its tokens)")
        require(self.expert in EXPERT_CHOICES,
                f"expert {self.expert!r} is not one of {EXPERT_CHOICES} (which experts of a two-expert base "
                "train)")
        self.layout()  # a pair layout or fit that does not exist fails here

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out).with_suffix(".work")

    def tokens(self) -> list[str]:
        """Every concept token once: the [v]s, then the [u]s (the order their embedding rows are added in)."""
        return _unique([c.token for c in self.concepts] + [c.motion_token for c in self.concepts])

    def stage_tokens(self, stage: int) -> list[str]:
        """Tokens whose embeddings a stage trains: [v]s in stage 1, [u]s in stage 2 (none if switched off)."""
        if not self.train_tokens:
            return []
        if self.single_stage:
            return self.tokens()
        return _unique([c.token if stage == 1 else c.motion_token for c in self.concepts])

    def concept_count(self) -> int:
        return distinct_concepts(self.concepts)

    def text_stage(self, stage: int) -> int:
        """Which stage's data and prompt a stage trains on: clips and the full prompt in single-stage mode."""
        return 2 if self.single_stage else stage

    def steps(self, stage: int) -> int:
        return self.steps1 if stage == 1 else self.steps2

    def dropout(self, stage: int) -> float:
        return self.dropout1 if stage == 1 else self.dropout2

    def stage_seed(self, stage: int) -> int:
        """A stage's draws start from its own seed, not from where the previous stage left the generators
        (a `--stage 2` run has no previous stage)."""
        return self.seed * 1000 + stage

    def train_shift(self, sample_shift: float) -> float:
        """The flow-time shift of training on clips: `time_shift`, else the base's sampling shift."""
        return sample_shift if self.time_shift is None else self.time_shift

    def stage_shift(self, sample_shift: float, stage: int) -> float:
        """The flow-time shift `stage` trains at: `frame_time_shift` where it trains on frames."""
        if self.text_stage(stage) == 1 and self.frame_time_shift is not None:
            return self.frame_time_shift
        return self.train_shift(sample_shift)

    def layout(self) -> PairLayout:
        return PairLayout(self.pair_layout, self.pair_fit)

    def stitches(self) -> bool:
        """Whether the run trains on stitched pairs (two concepts, or companions; and stitch_prob > 0)."""
        return self.stitch_prob > 0 and (self.concept_count() > 1 or bool(self.companion_prompts))

    def pair_plan(self) -> list[tuple[int, int]]:
        """(left, right) sources of the stitched pairs: concept videos are 0..n-1, companions n..n+m-1.
        Every ordered pair of videos of two different concepts, and each video beside each companion in
        both orders."""
        if not self.stitches():
            return []
        n, m = len(self.concepts), len(self.companion_prompts)
        beside = [p for i in range(n) for k in range(n, n + m) for p in ((i, k), (k, i))]
        two = [(i, j) for i, j in ordered_pairs(n) if self.concepts[i].token != self.concepts[j].token]
        return two + beside

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record(self) -> dict:
        """What a concept file keeps: the settings without how this invocation ran (INVOCATION), so a
        resumed run's file equals an uninterrupted run's byte for byte."""
        return {k: v for k, v in self.to_dict().items() if k not in INVOCATION}


INVOCATION = ("resume", "force", "progress")
EXPERT_CHOICES = ("both", "high", "low")

# Fields that may change between an interrupted run and its resume without changing the result.
# The learning rates are among them since a diverged run is continued from its last checkpoint with a
# lower one (the new rate applies from the resume on, and `resumed` records it).
RESUME_FREE = {"resume", "force", "progress", "preview_every", "preview_steps", "log_every",
               "checkpoint_every", "keep_checkpoints", "device", "out", "work_dir", "stages",
               "steps1", "steps2", "compile", "grad_checkpointing", "lr", "token_lr", "resumed"}
# Fields no config file sets.
INTERNAL = ("resumed",)


def distinct_concepts(concepts: list[ConceptSpec]) -> int:
    """How many concepts the specs train: videos sharing a token pair are one."""
    return len({c.token for c in concepts})


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path!r} is not valid TOML: {err}") from None


def read_toml_config(path: str | None, base_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(PersonalizeConfig values, base options named by `base_keys`) of a TOML file (none: empty); an
    unknown key names every known one."""
    values = read_toml(path) if path else {}
    extra = {k: values.pop(k) for k in base_keys if k in values}
    known = {f.name for f in fields(PersonalizeConfig)} - set(INTERNAL)
    if unknown := sorted(set(values) - known):
        every = ", ".join(sorted(known | set(base_keys)))
        raise ValueError(f"{path}: unknown keys {unknown}; known keys are {every}")
    check_types({k: v for k, v in values.items() if k != "concepts"}, PersonalizeConfig, str(path))
    check_concepts(values.get("concepts", []), str(path))
    return values, extra


def check_concepts(concepts, where: str) -> None:
    """[[concepts]] tables: known keys, the required ones present, each of its type."""
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        raise ValueError(f"{where}: concepts = {concepts!r}: expected [[concepts]] tables")
    allowed = sorted(f.name for f in fields(ConceptSpec))
    required = [f.name for f in fields(ConceptSpec) if f.default is MISSING]
    for i, c in enumerate(concepts, 1):
        if set(c) - set(allowed):
            raise ValueError(f"{where}: concept {i} has unknown keys {sorted(set(c) - set(allowed))}; "
                             f"use {', '.join(allowed)}")
        if missing := [k for k in required if k not in c]:
            raise ValueError(f"{where}: concept {i} lacks {', '.join(missing)}; each [[concepts]] table "
                             f"needs {' and '.join(required)}")
        check_types(c, ConceptSpec, f"{where}: concept {i}")


def check_types(values: dict, cls: type, where: str) -> None:
    """Each value against the type of its dataclass field (TOML arrays stand for tuples): an error naming
    the key, the value and the type expected, before a wrong type fails deep inside a run."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not fits(value, hints[key]):
            raise ValueError(f"{where}: {key} = {value!r}: expected {describe(hints[key])}")


def fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if args[-1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, hint)


_NAMES = {int: "integer", float: "finite number", str: "string", bool: "true or false", type(None): "none"}


def describe(hint) -> str:
    """'integer', 'list of 2 integers', 'finite number or none': a field's type in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is tuple and args[-1] is Ellipsis:
        return f"list of {describe(args[0])}s"
    if origin is tuple and len(set(args)) == 1:
        return f"list of {len(args)} {describe(args[0])}s"
    if origin is tuple:
        return f"list [{', '.join(describe(a) for a in args)}]"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))
