"""Set-and-Sequence personalization: stage 1 and stage 2 are two configurations of ONE loop.

    stage 1 (identity basis)    frame-set batches (random frames, each a 1-frame latent),
                                static prompt "a [v] ...", trains A1, B1 (+ [v] embeddings), B-dropout 0.8
    stage 2 (motion residual)   clip batches, static + dynamic prompt "... in [u] motion",
                                trains B2 only (+ [u] embeddings), B-dropout 0.5

Each step: draw item indices (concept items, plus prior-preservation items with weight w, or a
stitched pair of two concepts), look up cached latents and cached T5 outputs (re-encoding only
prompts that hold a trained token), caption dropout 0.1 (-> empty prompt), random text-token
masking, flow matching x_t = (1 - t) x0 + t eps against v = eps - x0, optional self-conditioning,
AdamW (0.9, 0.99), wd 0.01, lr 1e-4 constant (1e-5 for token embeddings), grad clip 0.05.

`main(cfg, base, sample_fn)` takes modules, not paths: the command line resolves the base model
(weights/) and the sampler (sample/) and passes them in, so train/ imports only model/ and lora/.
Every random draw of the loop comes from one generator (plus torch's global RNG for the LoRA
dropout masks); both are in the checkpoint, so a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from lora.concept import base_identity, concept_from_model, save_concept
from lora.inject import DEFAULT_TARGETS, concept_state_dict, inject_lora, load_concept_state_dict, set_stage
from lora.tokens import AddedTokens, add_tokens, write_token_rows
from model.base import Base
from model.config import ModelConfig
from model.flow import (
    add_noise,
    bin_labels,
    loss_by_t_bins,
    prediction_loss_per_sample,
    sample_time,
    x0_from_velocity,
)

from .checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from .data import (
    LatentCache,
    LatentSet,
    PromptTable,
    build_prompt_table,
    check_prompt,
    clip_items,
    encode_items,
    file_key,
    frame_items,
    mask_tokens,
    stitch,
    stitched_prompt,
)
from .prior import DEFAULT_PROMPTS, prior_sets
from .video import read_video, write_video

# ------------------------------------------------------------------------------------------- config


@dataclass
class ConceptSpec:
    """One video and its prompts. Several specs train into ONE adapter (one shared basis)."""

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
    prior_weight: float = 1.0  # loss = concept + prior_weight * prior
    prior_count: int = 4  # generations per stage (0 = no prior preservation)
    prior_per_batch: int = 2  # of batch_size
    prior_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    prior_steps: int | None = None  # sampler steps for the prior; None = the base model's default
    # Where stage 2 puts a concept's motion prompt: inside its static prompt, before the first occurrence of
    # this text (a base whose captions name the motion mid-sentence); "" = after it. A full_prompt wins.
    motion_before: str = ""
    stitch_prob: float = 0.25  # with several concepts: chance a step is a side-by-side pair
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
    compile: bool = False  # torch.compile each DiT block (H100, Wan 1.3B real size: step 2.83 -> 2.38 s)
    resume: bool = False
    force: bool = False  # overwrite an existing `out`
    progress: bool = True

    def __post_init__(self) -> None:
        self.concepts = [c if isinstance(c, ConceptSpec) else ConceptSpec(**c) for c in self.concepts]
        self.stages = tuple(sorted(set(self.stages)))
        self.targets, self.betas = tuple(self.targets), tuple(self.betas)
        self.prior_prompts = tuple(self.prior_prompts)
        if self.size is not None:
            self.size = tuple(self.size)
        for c in self.concepts:
            head, sep, tail = c.prompt.partition(self.motion_before or "\0")
            if sep and c.motion_prompt and not c.full_prompt:  # the motion words inside the sentence
                c.full_prompt = f"{head} {c.motion_prompt.strip()}{sep}{tail}"
        _check(bool(self.concepts), "no concept given: pass a VIDEO and its --prompt")
        _check(self.stages and set(self.stages) <= {1, 2}, f"stages must be 1, 2 or both, got {self.stages}")
        _check(not self.single_stage or self.stages == (1,),
               f"single_stage trains one stage on clips: set stages (1,), got {self.stages}")
        _check(self.train_lora or self.train_tokens,
               "train_lora and train_tokens are both off: nothing to train")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.steps1 >= 1 and self.steps2 >= 1, f"steps must be >= 1, got {self.steps1}, {self.steps2}")
        _check(self.prior_count == 0 or 0 < self.prior_per_batch < self.batch_size,
               f"prior_per_batch {self.prior_per_batch} must leave room in batch_size {self.batch_size} "
               "for concept items (or set prior_count 0)")
        for name in ("caption_dropout", "token_mask_prob", "self_cond_prob", "stitch_prob"):
            p = getattr(self, name)
            _check(0.0 <= p <= 1.0, f"{name} must be a probability in [0, 1], got {p}")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every, log_every must be >= 1")
        tokens = [c.token for c in self.concepts] + [c.motion_token for c in self.concepts]
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        _check(not dup, f"tokens {dup} are used by more than one concept; give each concept its own, "
                        "e.g. token '[v1]' / motion_token '[u1]', '[v2]' / '[u2]'")

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out).with_suffix(".work")

    def text_stage(self, stage: int) -> int:
        """Which stage's data and prompt a stage trains on: clips and the full prompt in single-stage mode."""
        return 2 if self.single_stage else stage

    def steps(self, stage: int) -> int:
        return self.steps1 if stage == 1 else self.steps2

    def dropout(self, stage: int) -> float:
        return self.dropout1 if stage == 1 else self.dropout2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may change between an interrupted run and its resume without changing the result.
_RESUME_FREE = {"resume", "force", "progress", "preview_every", "preview_steps", "log_every",
                "checkpoint_every", "keep_checkpoints", "device", "out", "work_dir", "stages",
                "steps1", "steps2", "compile", "grad_checkpointing"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; nothing after the last good checkpoint was written."""


# --------------------------------------------------------------------------------------- tokens


def _add_tokens(cfg: PersonalizeConfig, base: Base) -> AddedTokens:
    tokens = [c.token for c in cfg.concepts] + [c.motion_token for c in cfg.concepts]
    return add_tokens(base.t5, base.tokenizer, tokens)


def _stage_tokens(cfg: PersonalizeConfig, stage: int) -> list[str]:
    """Tokens whose embeddings a stage trains: [v]s in stage 1, [u]s in stage 2 (none if switched off)."""
    if not cfg.train_tokens:
        return []
    if cfg.single_stage:
        return [c.token for c in cfg.concepts] + [c.motion_token for c in cfg.concepts]
    return [c.token if stage == 1 else c.motion_token for c in cfg.concepts]


# ----------------------------------------------------------------------------------------- data


@dataclass
class StageData:
    """Everything a stage's loop indexes: concept items, stitched pairs, prior items, prompts."""

    items: LatentSet
    stitched: LatentSet | None
    prior: LatentSet | None
    prompts: PromptTable
    empty: int  # prompt row of "" (caption dropout)
    trained_ids: list[int] = field(default_factory=list)


def _clip_frames(cfg: PersonalizeConfig, available: int, mc: ModelConfig) -> int:
    if cfg.frames is not None:
        mc.check_frames(cfg.frames)
        return cfg.frames
    frames = mc.longest_clip(available)
    tc = mc.vae.time_compression
    _check(frames > 1, f"video has {available} frames, shorter than the shortest clip of {1 + tc} frames "
                       f"(1 + the VAE's time compression {tc}); give a longer video or a higher --fps")
    return frames


def read_videos(cfg: PersonalizeConfig, mc: ModelConfig) -> tuple[list[Tensor], int]:
    """Each concept's video as (C, T, H, W) in [-1, 1] at one common size; and the clip length."""
    multiple = mc.size_multiple
    videos = [read_video(c.video, fps=cfg.fps, size=cfg.size, multiple=multiple) for c in cfg.concepts]
    sizes = {tuple(v.shape[2:]) for v in videos}
    _check(len(sizes) == 1, f"the videos have different sizes {sorted(sizes)} after cropping; set --size H W "
                            "so that every concept is resized to the same frame size")
    frames = _clip_frames(cfg, min(v.shape[1] for v in videos), mc)
    for c, v in zip(cfg.concepts, videos, strict=True):
        _check(v.shape[1] >= frames, f"video {c.video!r} has {v.shape[1]} frames at the chosen fps, shorter "
                                     f"than one clip of {frames}; give a longer video, fewer --frames or a "
                                     "lower --fps")
    return videos, frames


def _weights_digest(module: nn.Module) -> str:
    """Cheap identity of a module's weights for cache keys: names, shapes and per-tensor sums."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _encode_latents(vae: nn.Module, items: Tensor) -> Tensor:
    device = next(vae.parameters()).device
    batch = 4 if items.shape[2] == 1 else 1  # frames encode four at a time, clips one at a time
    # chunk="auto": long clips stream (memory; see model/vae.py STREAM_ABOVE)
    return encode_items(lambda x: vae.encode(x.to(device), sample=False, chunk="auto"), items, batch=batch)


def stage_latents(cfg: PersonalizeConfig, base: Base, videos: list[Tensor], frames: int, stage: int,
                  cache: LatentCache) -> tuple[list[Tensor], list[Tensor]]:
    """VAE latents of each concept's items and of each stitched pair (computed once, cached on disk)."""
    key = {"vae": _weights_digest(base.vae), "base": base.name, "stage": stage, "frames": frames,
           "fps": cfg.fps, "size": list(videos[0].shape[2:]), "clips": cfg.text_stage(stage) == 2}

    def items(v: Tensor) -> Tensor:
        return frame_items(v) if cfg.text_stage(stage) == 1 else clip_items(v, frames)

    def encoded(name: str, k: dict, pixels: Callable[[], Tensor]) -> Tensor:
        return cache.get(name, {**key, **k}, lambda: {"z": _encode_latents(base.vae, pixels())})["z"]

    singles = [encoded(f"latents-stage{stage}", {"video": file_key(c.video)}, lambda v=v: items(v))
               for c, v in zip(cfg.concepts, videos, strict=True)]
    pairs = [encoded(f"stitched-stage{stage}",
                     {"pair": [file_key(cfg.concepts[i].video), file_key(cfg.concepts[j].video)]},
                     lambda i=i, j=j: stitch(items(videos[i]), items(videos[j])))
             for i, j in _pairs(len(videos))]
    return singles, pairs


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def stage_prompts(cfg: PersonalizeConfig, stage: int) -> tuple[list[str], list[str]]:
    """Each concept's prompt in `stage`, and the stitched prompt of each pair (in `_pairs` order)."""
    texts = [c.text(cfg.text_stage(stage)) for c in cfg.concepts]
    return texts, [stitched_prompt(texts[i], texts[j]) for i, j in _pairs(len(texts))]


def build_stage_data(cfg: PersonalizeConfig, base: Base, stage: int, singles: list[Tensor],
                     pairs: list[Tensor], prior, tokens: AddedTokens) -> StageData:
    """Prompt table and index sets of one stage, on the training device."""
    texts, pair_texts = stage_prompts(cfg, stage)
    prior_texts = prior.texts if prior is not None else []
    trained_ids = [tokens.ids[t] for t in _stage_tokens(cfg, stage)]
    table = build_prompt_table(["", *texts, *pair_texts, *prior_texts], base.tokenizer, base.t5,
                               base.config.t5.max_length, trained_ids)

    def latent_set(latents: list[Tensor], prompts: list[str], groups: list[int]) -> LatentSet:
        rows = [table.index(p) for p, z in zip(prompts, latents, strict=True) for _ in range(z.shape[0])]
        grp = [g for g, z in zip(groups, latents, strict=True) for _ in range(z.shape[0])]
        return LatentSet(torch.cat(latents), torch.tensor(rows), torch.tensor(grp)).to(cfg.device)

    items = latent_set(singles, texts, list(range(len(texts))))
    stitched = latent_set(pairs, pair_texts, [-1] * len(pairs)) if pairs else None
    prior_set = None
    if prior is not None:
        prior_set = latent_set(list(prior.latents.split(1)), prior.texts, [0] * len(prior.texts))
    return StageData(items, stitched, prior_set, table, table.index(""), trained_ids)


# ---------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    x0: Tensor  # (B, C, T', H', W')
    prompt: Tensor  # (B,) prompt rows, after caption dropout
    weight: Tensor  # (B,) loss weight per item: 1/n for concept items, w/n_prior for prior items
    is_prior: Tensor  # (B,) bool


def draw_batch(cfg: PersonalizeConfig, data: StageData, g: torch.Generator) -> Batch:
    """Concept items (+ prior items), or a stitched pair; then caption dropout on the prompts."""
    device = data.items.latents.device
    coin = float(torch.rand((), generator=g, device=device))
    stitched = data.stitched is not None and coin < cfg.stitch_prob
    n_prior = 0 if stitched or data.prior is None else cfg.prior_per_batch
    source = data.stitched if stitched else data.items
    idx = source.sample(cfg.batch_size - n_prior, g)
    x0, prompt = source.latents[idx], source.prompt[idx]
    weight = torch.full((len(idx),), 1.0 / len(idx), device=device)
    if n_prior:
        pidx = data.prior.sample(n_prior, g)
        x0 = torch.cat([x0, data.prior.latents[pidx]])
        prompt = torch.cat([prompt, data.prior.prompt[pidx]])
        weight = torch.cat([weight, torch.full((n_prior,), cfg.prior_weight / n_prior, device=device)])
    drop = torch.rand(len(prompt), generator=g, device=device) < cfg.caption_dropout
    prompt = torch.where(drop, torch.full_like(prompt, data.empty), prompt)
    is_prior = torch.arange(len(prompt), device=device) >= len(idx)
    return Batch(x0, prompt, weight, is_prior)


def batch_context(data: StageData, prompt: Tensor, t5: nn.Module, train_tokens: bool
                  ) -> tuple[Tensor, Tensor]:
    """(context (B, L, D), mask (B, L)) for prompt rows: cached T5 outputs, except rows holding a
    trained token, which run through T5 now so the gradient reaches their embeddings."""
    table = data.prompts
    context = table.context
    rows = prompt.unique()
    rows = rows[table.trainable[rows]] if train_tokens else rows[:0]
    if len(rows):
        fresh = t5(table.ids[rows], table.mask[rows]).float()  # (R, L, D), with grad to the tokens
        context = context.index_put((rows,), fresh)  # out of place: the cache stays untouched
    # index_select, not context[prompt]: the backward of advanced indexing accumulates repeated rows
    # in a thread-dependent order on the CPU (2-thread runs differed by 2e-4 after 60 steps)
    return context.index_select(0, prompt), table.mask[prompt]


# ----------------------------------------------------------------------------------------- step


@dataclass
class StepOut:
    loss: Tensor  # scalar, weighted concept + prior
    per_sample: Tensor  # (B,) detached
    t: Tensor  # (B,)
    batch: Batch


def loss_step(cfg: PersonalizeConfig, dit: nn.Module, t5: nn.Module, data: StageData, g: torch.Generator,
              shift: float) -> StepOut:
    """One flow-matching loss on a drawn batch (forward only; the caller steps the optimizer)."""
    batch = draw_batch(cfg, data, g)
    x0 = batch.x0
    b, device = x0.shape[0], x0.device
    context, mask = batch_context(data, batch.prompt, t5, bool(data.trained_ids))
    context, mask = mask_tokens(context, mask, cfg.token_mask_prob, g)
    t = sample_time(b, shift=shift, generator=g, device=device)
    eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
    x_t = add_noise(x0, eps, t)
    self_cond = None
    if getattr(dit.cfg, "self_cond", False) and cfg.self_cond_prob > 0:
        use = torch.rand(b, generator=g, device=device) < cfg.self_cond_prob
        if bool(use.any()):
            with torch.no_grad():  # the model's own x0 estimate, fed back as input (Chen et al.)
                v0 = dit(x_t, t, context.detach(), context_mask=mask)
            self_cond = x0_from_velocity(x_t, v0, t) * use.view(-1, 1, 1, 1, 1).to(x_t.dtype)
    v = dit(x_t, t, context, context_mask=mask, self_cond=self_cond)
    # The loss lives in the base's own prediction space (x0 for the toy world's tiny DiT).
    space = getattr(dit.cfg, "prediction", "velocity")
    per_sample = prediction_loss_per_sample(v, x_t, x0, eps, t, space)  # (B,) fp32
    return StepOut((batch.weight * per_sample).sum(), per_sample.detach(), t, batch)


# ------------------------------------------------------------------------------------ logging


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class LossLog:
    """A TSV a person can read: one row per `log_every` steps, loss overall, concept and prior,
    gradient norm, and the concept loss per flow-time bin (which noise levels are learned)."""

    def __init__(self, path: Path, bins: int, enabled: bool):
        self.path, self.bins, self.enabled = path, bins, enabled
        self.labels = bin_labels(bins)
        self._reset()
        if enabled and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\t".join(["stage", "step", "loss", "concept", "prior", "grad_norm", "seconds",
                                       *self.labels]) + "\n")

    def _reset(self) -> None:
        self.n, self.loss, self.concept, self.prior, self.gnorm = 0, 0.0, [], [], 0.0
        self.bin_sum, self.bin_count = torch.zeros(self.bins), torch.zeros(self.bins)
        self.start = time.perf_counter()

    def add(self, out: StepOut, grad_norm: float) -> None:
        self.n += 1
        self.loss += float(out.loss.detach())
        self.gnorm += grad_norm
        prior = out.batch.is_prior.cpu()
        per, t = out.per_sample.cpu(), out.t.cpu()
        self.concept += per[~prior].tolist()
        self.prior += per[prior].tolist()
        mean, count = loss_by_t_bins(per[~prior], t[~prior], self.bins)
        self.bin_sum += torch.nan_to_num(mean) * count
        self.bin_count += count

    def flush(self, stage: int, step: int) -> dict:
        bins = (self.bin_sum / self.bin_count).tolist()
        row = {"stage": stage, "step": step, "loss": self.loss / max(self.n, 1),
               "concept": _mean(self.concept),
               "prior": _mean(self.prior), "grad_norm": self.gnorm / max(self.n, 1),
               "seconds": time.perf_counter() - self.start, **dict(zip(self.labels, bins, strict=True))}
        if self.enabled and self.n:
            cells = [str(stage), str(step)] + [f"{row[k]:.5g}" for k in list(row)[2:]]
            with open(self.path, "a") as f:
                f.write("\t".join(cells) + "\n")
        self._reset()
        return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ------------------------------------------------------------------------------------- previews


@torch.no_grad()
def write_preview(path: Path, cfg: PersonalizeConfig, base: Base, data: StageData, stage: int,
                  sample_fn: Callable[..., Tensor]) -> None:
    """A short sample of the first concept with the current adapter, decoded to a gif (stage 1: one frame)."""
    dit, device = base.dit, data.items.latents.device
    latent_shape = tuple(data.items.latents.shape[1:])
    text = cfg.concepts[0].text(cfg.text_stage(stage))
    rows = torch.tensor([data.prompts.index(text), data.empty], device=device)
    ctx = base.t5(data.prompts.ids[rows], data.prompts.mask[rows]).float()
    dit.eval()
    mask = data.prompts.mask[rows]
    z = sample_fn(dit, (1, *latent_shape), (ctx[:1], mask[:1]), (ctx[1:], mask[1:]), steps=cfg.preview_steps,
                  guidance=base.config.guidance, shift=_shift(cfg, base),
                  generator=torch.Generator(device).manual_seed(cfg.seed))
    dit.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, base.vae.decode(z.to(next(base.vae.parameters()).dtype), chunk="auto")[0],
                fps=cfg.fps or 8.0)


def _shift(cfg: PersonalizeConfig, base: Base) -> float:
    return base.config.sample_shift if cfg.time_shift is None else cfg.time_shift


# --------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int, g: torch.Generator) -> None:
    torch.manual_seed(seed)
    g.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _stage_seed(cfg: PersonalizeConfig, stage: int) -> int:
    return cfg.seed * 1000 + stage


# ------------------------------------------------------------------------------------------ main


def _trained_params(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens, stage: int):
    set_stage(dit, stage if cfg.train_lora else 0, concepts=[cfg.name], dropout=cfg.dropout(stage))
    lora = [p for p in dit.parameters() if p.requires_grad]
    for p in tokens.parameters():
        p.requires_grad_(False)
    emb = [tokens.embedding(t) for t in _stage_tokens(cfg, stage)]
    for p in emb:
        p.requires_grad_(True)
    return lora, emb


def build_optimizer(cfg: PersonalizeConfig, lora: list[nn.Parameter], emb: list[nn.Parameter]
                    ) -> torch.optim.AdamW:
    """AdamW (paper Table 6); the token embeddings in their own group at token_lr. Fused: one kernel over
    every tensor instead of a Python loop over ~100 small LoRA factors (CPU: 2.0 vs 7.3 ms a step with
    the clip at the small benchmark size; results agree with the loop to float rounding)."""
    groups = [{"params": lora, "lr": cfg.lr}] if lora else []
    if emb:
        groups.append({"params": emb, "lr": cfg.token_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


def adapter_state(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens) -> dict[str, Tensor]:
    """Everything the run has learned: the adapter's A1, B1, B2 and the token embeddings."""
    state = {f"lora.{k}": v for k, v in concept_state_dict(dit, cfg.name).items()}
    state.update({f"token.{k}": v for k, v in tokens.state().items()})
    return state


def load_adapter_state(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens,
                       state: dict[str, Tensor]) -> None:
    load_concept_state_dict(dit, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, cfg.name)
    tokens.load({k[6:]: v for k, v in state.items() if k.startswith("token.")})


def _check_resume_config(cfg: PersonalizeConfig, saved: dict, stage: int, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: same settings, except the _RESUME_FREE ones
    (and the motion prompts when the checkpoint is from stage 1: a `--stage 1` run may lack them)."""
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUME_FREE | {"concepts"} and _js(now[k]) != _js(saved.get(k)))
    keys = ("video", "prompt", "token", "motion_token") + (("motion_prompt",) if stage == 2 else ())
    pick = lambda cs: [{k: c.get(k) for k in keys} for c in cs]  # noqa: E731
    if _js(pick(now["concepts"])) != _js(pick(saved.get("concepts", []))):
        diff.append("concepts")
    _check(not diff, f"checkpoint {path} was written with different settings for {diff} "
                     f"(e.g. {diff[0] if diff else ''}: {saved.get(diff[0]) if diff else ''!r} then, "
                     f"{now.get(diff[0]) if diff else ''!r} now); resume with the same options, "
                     "or start fresh with another --work-dir")


def _js(value) -> str:
    return json.dumps(value, sort_keys=True)


def check_inputs(cfg: PersonalizeConfig, base: Base, tokens: AddedTokens) -> None:
    """Fail before any work: existing output, prompts without their tokens."""
    if Path(cfg.out).exists() and not cfg.force:
        raise ValueError(f"{cfg.out} exists; pass --force to overwrite it, or choose another --out")
    for i, c in enumerate(cfg.concepts):
        what = f"concept {i + 1} prompt" if len(cfg.concepts) > 1 else "--prompt"
        check_prompt(c.prompt, c.token, what, base.tokenizer, base.config.t5.max_length)
        if 2 in cfg.stages or cfg.single_stage:
            what = f"concept {i + 1} motion prompt" if len(cfg.concepts) > 1 else "--motion-prompt"
            check_prompt(c.text(2), c.motion_token, what, base.tokenizer, base.config.t5.max_length)
    if len(cfg.concepts) > 1 and cfg.stitch_prob > 0:  # a stitched pair's prompt holds both concepts' tokens
        for stage in cfg.stages:
            for (i, j), pair in zip(_pairs(len(cfg.concepts)), stage_prompts(cfg, stage)[1], strict=True):
                what = f"the stitched prompt of concepts {i + 1} and {j + 1} (stitch_prob > 0)"
                for c in (cfg.concepts[i], cfg.concepts[j]):
                    for token in (c.token, c.motion_token) if cfg.text_stage(stage) == 2 else (c.token,):
                        check_prompt(pair, token, what, base.tokenizer, base.config.t5.max_length)


def _resume_point(cfg: PersonalizeConfig) -> Checkpoint | None:
    """The checkpoint to start from, or None for a fresh run.

    --resume: the latest checkpoint, if any. `--stage 2` alone: the final stage-1 checkpoint of the
    same work dir (from an earlier `--stage 1` run). Otherwise existing checkpoints are an error,
    so a new run never mixes with an old one.
    """
    folder = cfg.work / "checkpoints"
    found = list_checkpoints(folder)
    stage2 = [p for p in found if p.name.startswith("stage2")]
    if cfg.resume:
        ckpt = load_checkpoint(found[-1]) if found else None
    elif cfg.stages == (2,):
        _check(not stage2, f"{folder} already holds stage-2 checkpoints; pass --resume to continue them, "
                           "or choose another --work-dir")
        final = checkpoint_path(folder, 1, cfg.steps1)
        _check(final.is_file(), f"stage 2 needs the finished stage 1 ({final}), which does not exist; "
                                "run --stage 1 first with the same --out / --work-dir / --steps1")
        ckpt = load_checkpoint(final)
    else:
        _check(not found, f"{folder} already holds checkpoints ({found[-1].name if found else ''}); "
                          "pass --resume to continue that run, or choose another --work-dir")
        ckpt = None
    if ckpt is not None and cfg.stages == (2,):
        _check(ckpt.stage == 2 or ckpt.step >= cfg.steps1,
               f"stage 2 needs a finished stage 1, but the latest checkpoint {ckpt.path} is stage 1 step "
               f"{ckpt.step} of {cfg.steps1}; finish it with --stage 1 --resume")
    if ckpt is not None:
        _check_resume_config(cfg, ckpt.config, ckpt.stage, ckpt.path)
    return ckpt


def main(cfg: PersonalizeConfig, base: Base, sample_fn: Callable[..., Tensor] | None = None) -> Path:
    """Train the concept through the configured stages; returns the concept file's path."""
    # -- setup --------------------------------------------------------------------------------
    main_proc = is_main_process()
    device = torch.device(cfg.device)
    g = torch.Generator(device)
    seed_everything(cfg.seed, g)
    cache = LatentCache(cfg.work / "cache")
    if cfg.prior_count and sample_fn is None:
        raise ValueError("prior preservation needs a sampler (sample_fn); pass one or set prior_count 0")
    if cfg.preview_every and sample_fn is None:
        raise ValueError("previews need a sampler (sample_fn); pass one or set preview_every 0")
    base.t5.requires_grad_(False).eval()
    base.vae.requires_grad_(False).eval()
    base.dit.requires_grad_(False)

    # -- text: concept tokens, their embeddings (zero-initialized), input checks -------------------
    tokens = _add_tokens(cfg, base)
    hook = base.t5.token_embedding.register_forward_hook(tokens.hook)
    try:
        check_inputs(cfg, base, tokens)
        ckpt = _resume_point(cfg)

        # -- data: videos -> cached latents; prior preservation from the base model (no adapter) ---
        videos, frames = read_videos(cfg, base.config)
        latents = {s: stage_latents(cfg, base, videos, frames, s, cache) for s in cfg.stages}
        priors = {}
        if cfg.prior_count and cfg.prior_weight:
            shapes = {cfg.text_stage(s): tuple(latents[s][0][0].shape[1:]) for s in cfg.stages}
            encode = _encoder(base)
            prompts = [cfg.prior_prompts[i % len(cfg.prior_prompts)] for i in range(cfg.prior_count)]
            priors = prior_sets(base.dit, encode, sample_fn, prompts, shapes, cache=cache,
                                key={"dit": _weights_digest(base.dit), "base": base.name},
                                steps=cfg.prior_steps or base.config.sample_steps,
                                guidance=base.config.guidance, shift=base.config.sample_shift, seed=cfg.seed)

        # -- model: the adapter (one shared basis for every concept) -------------------------------
        torch.manual_seed(cfg.seed)
        inject_lora(base.dit, cfg.targets, cfg.rank, name=cfg.name)
        base.dit.gradient_checkpointing = cfg.grad_checkpointing
        if cfg.compile:  # after the LoRA is in place, so the compiled blocks hold it
            base.dit.compile_blocks()
        base.dit.train()
        log = LossLog(cfg.work / "loss.tsv", cfg.loss_bins, main_proc)
        if ckpt is not None:
            load_adapter_state(cfg, base.dit, tokens, ckpt.params)

        # -- the stages: one loop, two configurations ------------------------------------------------
        for stage in cfg.stages:
            if ckpt is not None and (ckpt.stage, ckpt.step) >= (stage, cfg.steps(stage)):
                continue  # finished before the interruption
            prior = priors.get(cfg.text_stage(stage))
            data = build_stage_data(cfg, base, stage, *latents[stage], prior, tokens)
            resume = ckpt if ckpt is not None and ckpt.stage == stage else None
            run_stage(cfg, base, data, tokens, stage, g, resume, log, sample_fn)

        # -- the concept file --------------------------------------------------------------------------
        if main_proc:
            save_concept(cfg.out, make_concept(cfg, base, tokens))
        write_token_rows(base.t5, tokens.rows())  # the caller's T5 knows the trained tokens without the hook
        return Path(cfg.out)
    finally:
        hook.remove()


def _encoder(base: Base) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    device = next(base.t5.parameters()).device

    @torch.no_grad()
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = base.tokenizer.encode(texts, base.config.t5.max_length)
        return base.t5(ids.to(device), mask.to(device)).float(), mask.to(device)

    return encode


def make_concept(cfg: PersonalizeConfig, base: Base, tokens: AddedTokens):
    prompts = {}
    for i, c in enumerate(cfg.concepts):
        suffix = "" if len(cfg.concepts) == 1 else f".{i}"
        prompts[f"static{suffix}"] = c.prompt
        prompts[f"dynamic{suffix}"] = c.motion_prompt
    return concept_from_model(base.dit, cfg.name, base_identity(base.dit, base.name), adapter=cfg.name,
                              targets=tuple(cfg.targets), tokens=tokens.state(), prompts=prompts,
                              train_config=cfg.to_dict())


def _diverged(what: str, value: float, stage: int, step: int, folder: Path) -> str:
    last = latest_checkpoint(folder)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    return (f"{what} became {value} at stage {stage} step {step + 1}; training stopped, nothing after the "
            f"last checkpoint was written and {kept} (continue with --resume, perhaps with a lower --lr)")


def run_stage(cfg: PersonalizeConfig, base: Base, data: StageData, tokens: AddedTokens, stage: int,
              g: torch.Generator, resume, log: LossLog, sample_fn) -> None:
    """The loop: draw, forward, backward, clip, step; log, preview, checkpoint."""
    main_proc = is_main_process()
    dit = base.dit
    lora, emb = _trained_params(cfg, dit, tokens, stage)
    optimizer = build_optimizer(cfg, lora, emb)
    params = lora + emb
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        restore_rng(resume.rng, g)
        start = resume.step
    else:
        seed_everything(_stage_seed(cfg, stage), g)
    folder = cfg.work / "checkpoints"
    shift = _shift(cfg, base)
    cuda = g.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    steps = cfg.steps(stage)
    bar = tqdm(range(start, steps), desc=f"stage {stage}", initial=start, total=steps,
               disable=not (cfg.progress and main_proc))
    for step in bar:
        with autocast:
            out = loss_step(cfg, dit, base.t5, data, g, shift)
        if not torch.isfinite(out.loss):
            raise NonFiniteLoss(_diverged("loss", float(out.loss.detach()), stage, step, folder))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True))
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(_diverged("gradient norm", grad_norm, stage, step, folder))
        optimizer.step()
        log.add(out, grad_norm)
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = log.flush(stage, done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", concept=f"{row['concept']:.4f}")
        if main_proc and cfg.preview_every and done % cfg.preview_every == 0:
            write_preview(cfg.work / "previews" / f"stage{stage}-step{done:06d}.gif", cfg, base, data, stage,
                          sample_fn)
        if main_proc and (done % cfg.checkpoint_every == 0 or done == steps):
            save_checkpoint(checkpoint_path(folder, stage, done), stage=stage, step=done,
                            params=adapter_state(cfg, dit, tokens), optimizer=optimizer, rng=capture_rng(g),
                            config=cfg.to_dict())
            prune_checkpoints(folder, cfg.keep_checkpoints)
    bar.close()
