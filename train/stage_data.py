"""A stage's data: videos -> cached latents and prompt rows (`StageData`), and the batches drawn from it.

    stage 1   each video's frames, one 1-frame latent each, with the static prompt
    stage 2   each video's clips, with static + dynamic prompt
    both      stitched pairs in the base's two-object layout (train/pairs.py): every ordered pair of
              concepts, and each concept beside the base's own generation of an ordinary object
              (companions), with a prompt naming both; and the prior preservation set: the base
              model's own generations (train/prior.py)

Latents are encoded once and cached on disk, keyed by the VAE's weights; T5 outputs are cached in
the prompt table, except for prompts holding a token the stage trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lora.tokens import AddedTokens
from model.base import Base
from model.config import ModelConfig

from .config import PersonalizeConfig, require
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
)
from .prior import PriorSet, generate_prior, prior_sets, split_prompt
from .video import read_video

# ------------------------------------------------------------------------------------------- videos


def _clip_frames(cfg: PersonalizeConfig, available: int, mc: ModelConfig) -> int:
    if cfg.frames is not None:
        mc.check_frames(cfg.frames)
        return cfg.frames
    frames = mc.longest_clip(available)
    tc = mc.vae.time_compression
    require(frames > 1, f"video has {available} frames, shorter than the shortest clip of {1 + tc} frames "
                        f"(1 + the VAE's time compression {tc}); give a longer video or a higher --fps")
    return frames


def read_videos(cfg: PersonalizeConfig, mc: ModelConfig) -> tuple[list[Tensor], int]:
    """Each concept's video as (C, T, H, W) in [-1, 1] at one common size; and the clip length."""
    multiple = mc.size_multiple
    videos = [read_video(c.video, fps=cfg.fps, size=cfg.size, multiple=multiple) for c in cfg.concepts]
    sizes = {tuple(v.shape[2:]) for v in videos}
    require(len(sizes) == 1, f"the videos have different sizes {sorted(sizes)} after cropping; "
                             "set --size H W so that every concept is resized to the same frame size")
    frames = _clip_frames(cfg, min(v.shape[1] for v in videos), mc)
    for c, v in zip(cfg.concepts, videos, strict=True):
        require(v.shape[1] >= frames, f"video {c.video!r} has {v.shape[1]} frames at the chosen fps, shorter "
                                      f"than one clip of {frames}; give a longer video, fewer --frames or a "
                                      "lower --fps")
    return videos, frames


# ------------------------------------------------------------------------------------------ latents


def weights_digest(module: nn.Module, device: torch.device | str | None = None) -> str:
    """Cheap identity of a module's weights for cache keys: names, shapes and per-tensor sums. Reads whole
    tensors: under torchrun it is taken before sharding, each tensor summed on `device` (one at a time), so
    the sums and the key are one process's on that device."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        p = p if device is None else p.to(device)
        h.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _encode_latents(vae: nn.Module, items: Tensor) -> Tensor:
    device = next(vae.parameters()).device
    batch = 4 if items.shape[2] == 1 else 1  # frames encode four at a time, clips one at a time
    # chunk="auto": long clips stream (memory; see model/vae.py STREAM_ABOVE)
    return encode_items(lambda x: vae.encode(x.to(device), sample=False, chunk="auto"), items, batch=batch)


def stage_latents(cfg: PersonalizeConfig, base: Base, videos: list[Tensor], frames: int, stage: int,
                  cache: LatentCache, companions: list[Tensor] = ()) -> tuple[list[Tensor], list[Tensor]]:
    """VAE latents of each concept's items and of each stitched pair (computed once, cached on disk);
    companions: the base's generations stitched beside the concepts (pixels, see companion_videos)."""
    key = {"vae": weights_digest(base.vae), "base": base.name, "stage": stage, "frames": frames,
           "fps": cfg.fps, "size": list(videos[0].shape[2:]), "clips": cfg.text_stage(stage) == 2}

    def items(v: Tensor) -> Tensor:
        return frame_items(v) if cfg.text_stage(stage) == 1 else clip_items(v, frames)

    def encoded(name: str, k: dict, pixels: Callable[[], Tensor]) -> Tensor:
        return cache.get(name, {**key, **k}, lambda: {"z": _encode_latents(base.vae, pixels())})["z"]

    singles = [encoded(f"latents-stage{stage}", {"video": file_key(c.video)}, lambda v=v: items(v))
               for c, v in zip(cfg.concepts, videos, strict=True)]
    layout, sources = cfg.layout(), [*videos, *companions]
    names = [file_key(c.video) for c in cfg.concepts] + [
        {"companion": p, "sum": float(v.double().sum())}
        for p, v in zip(cfg.companion_prompts, companions, strict=True)]
    pairs = [encoded(f"stitched-stage{stage}", {"pair": [names[i], names[j]],
                                                "layout": [layout.name, layout.fit]},
                     lambda i=i, j=j: items(layout.video(sources[i], sources[j])))
             for i, j in cfg.pair_plan()]
    return singles, pairs


def companion_videos(cfg: PersonalizeConfig, base: Base, frames: int, size: tuple[int, int],
                     sample_fn: Callable[..., Tensor], cache: LatentCache, dit_key: str | None = None
                     ) -> list[Tensor]:
    """The base's own generations (no adapter) of the companion prompts' full parts, decoded:
    (C, frames, H, W) each in [-1, 1]; none without companions. Call before any adapter is injected (or
    with it hidden). `dit_key`: the DiT's `weights_digest` when it was taken before sharding."""
    if not (cfg.companion_prompts and cfg.stitches()):
        return []
    require(sample_fn is not None, "companion prompts need a sampler (sample_fn)")
    shape = base.config.latent_shape(frames, size)
    texts = [split_prompt(p)[1] for p in cfg.companion_prompts]
    key = {"dit": dit_key or weights_digest(base.dit), "vae": weights_digest(base.vae), "base": base.name,
           "texts": texts, "shape": list(shape), "seed": cfg.seed, "steps": cfg.prior_steps}

    @torch.no_grad()
    def compute() -> dict[str, Tensor]:
        z = generate_prior(base.dit, _encoder(base), sample_fn, texts, shape,
                           steps=cfg.prior_steps or base.config.sample_steps, guidance=base.config.guidance,
                           shift=base.config.sample_shift, seed=cfg.seed + 7)
        weight = next(base.vae.parameters())
        pixels = [base.vae.decode(z[i : i + 1].to(weight.device, weight.dtype), chunk="auto")[0].float().cpu()
                  for i in range(len(z))]
        return {"videos": torch.stack(pixels).clamp(-1, 1)}

    return list(cache.get("companions", key, compute)["videos"])


def prior_latents(cfg: PersonalizeConfig, base: Base, latents: dict[int, tuple[list[Tensor], list[Tensor]]],
                  sample_fn: Callable[..., Tensor] | None, cache: LatentCache, dit_key: str | None = None
                  ) -> dict[int, PriorSet]:
    """The base model's own generations per text stage, in the shape of that stage's items (call it before
    the adapter is injected, or with it hidden); none when prior preservation is off. `dit_key` as in
    companion_videos."""
    if not (cfg.prior_count and cfg.prior_weight):
        return {}
    shapes = {cfg.text_stage(s): tuple(latents[s][0][0].shape[1:]) for s in cfg.stages}
    prompts = [cfg.prior_prompts[i % len(cfg.prior_prompts)] for i in range(cfg.prior_count)]
    return prior_sets(base.dit, _encoder(base), sample_fn, prompts, shapes, cache=cache,
                      key={"dit": dit_key or weights_digest(base.dit), "base": base.name},
                      steps=cfg.prior_steps or base.config.sample_steps,
                      guidance=base.config.guidance, shift=base.config.sample_shift, seed=cfg.seed)


def _encoder(base: Base) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    device = next(base.t5.parameters()).device

    @torch.no_grad()
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = base.tokenizer.encode(texts, base.config.t5.max_length)
        return base.t5(ids.to(device), mask.to(device)).float(), mask.to(device)

    return encode


# ------------------------------------------------------------------------------------------ prompts


def stage_prompts(cfg: PersonalizeConfig, stage: int) -> tuple[list[str], list[str]]:
    """Each concept's prompt in `stage`, and the stitched prompt of each pair (in `cfg.pair_plan` order)."""
    texts = [c.text(cfg.text_stage(stage)) for c in cfg.concepts]
    part = 0 if cfg.text_stage(stage) == 1 else 1  # a companion's static part in stage 1, all of it in 2
    sources = texts + [split_prompt(p)[part] for p in cfg.companion_prompts]
    return texts, [cfg.layout().prompt(sources[i], sources[j]) for i, j in cfg.pair_plan()]


def check_prompts(cfg: PersonalizeConfig, base: Base) -> None:
    """Every prompt a run trains on holds the tokens it must, and fits the text encoder."""
    length = base.config.t5.max_length
    for i, c in enumerate(cfg.concepts):
        what = f"concept {i + 1} prompt" if len(cfg.concepts) > 1 else "--prompt"
        check_prompt(c.prompt, c.token, what, base.tokenizer, length)
        if 2 in cfg.stages or cfg.single_stage:
            what = f"concept {i + 1} motion prompt" if len(cfg.concepts) > 1 else "--motion-prompt"
            if c.motion_prompt:  # the words the user gave first: the joined stage-2 text would quote others
                check_prompt(c.motion_prompt, c.motion_token, what, base.tokenizer, length)
            joined = f"{what} (joined: the stage-2 text)"
            check_prompt(c.text(2), c.motion_token, joined, base.tokenizer, length)
    if cfg.stitches():
        _check_stitched_prompts(cfg, base)


def _check_stitched_prompts(cfg: PersonalizeConfig, base: Base) -> None:
    """A stitched pair's prompt must hold both concepts' tokens (truncation could drop the second's)."""
    for stage in cfg.stages:
        for (i, j), pair in zip(cfg.pair_plan(), stage_prompts(cfg, stage)[1], strict=True):
            what = f"the stitched prompt of concepts {i + 1} and {j + 1} (stitch_prob > 0)"
            for c in (cfg.concepts[k] for k in (i, j) if k < len(cfg.concepts)):
                for token in (c.token, c.motion_token) if cfg.text_stage(stage) == 2 else (c.token,):
                    check_prompt(pair, token, what, base.tokenizer, base.config.t5.max_length)


# --------------------------------------------------------------------------------------- stage data


@dataclass
class StageData:
    """Everything a stage's loop indexes: concept items, stitched pairs, prior items, prompts."""

    items: LatentSet
    stitched: LatentSet | None
    prior: LatentSet | None
    prompts: PromptTable
    empty: int  # prompt row of "" (caption dropout)
    trained_ids: list[int] = field(default_factory=list)


def build_stage_data(cfg: PersonalizeConfig, base: Base, stage: int, singles: list[Tensor],
                     pairs: list[Tensor], prior: PriorSet | None, tokens: AddedTokens) -> StageData:
    """Prompt table and index sets of one stage, on the training device."""
    texts, pair_texts = stage_prompts(cfg, stage)
    prior_texts = prior.texts if prior is not None else []
    trained_ids = [tokens.ids[t] for t in cfg.stage_tokens(stage)]
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


# ------------------------------------------------------------------------------------------ batches


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
