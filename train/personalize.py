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

    train/config.py       what to train (ConceptSpec, PersonalizeConfig)
    train/stage_data.py   videos -> cached latents, prompt rows, prior set; batches
    train/step.py         trained parameters, optimizer, the loss of one batch
    train/resume.py       seeds, learned state, which checkpoint a run continues
    train/log.py          loss table, previews
    here                  `main` and the loop

`main(cfg, base, sample_fn)` takes modules, not paths: the command line resolves the base model
(weights/) and the sampler (sample/) and passes them in, so train/ imports only model/ and lora/.
A resumed run equals an uninterrupted one bit for bit (train/resume.py says how).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lora.concept import BaseIdentity, Concept, base_identity, concept_from_model, save_concept
from lora.inject import inject_lora
from lora.tokens import AddedTokens, add_tokens, write_token_rows
from model.base import Base

from . import distributed
from .checkpoint import Checkpoint, latest_checkpoint
from .config import PersonalizeConfig
from .data import LatentCache
from .log import LossLog, write_preview
from .preflight import check_clips, check_memory
from .resume import (
    load_adapter_state,
    replaces_stage1,
    resume_point,
    save_stage_checkpoint,
    seed_everything,
    start_stage,
)
from .stage_data import (
    StageData,
    build_stage_data,
    check_prompts,
    companion_videos,
    prior_latents,
    read_videos,
    stage_latents,
    weights_digest,
)
from .step import BLOWUP, AdapterGrowth, build_optimizer, loss_step, trained_params


class Diverged(RuntimeError):
    """The loss or gradient became NaN or inf, or an adapter blew up (step.BLOWUP); the step's checkpoint
    was not written, so every checkpoint on disk is from before."""


def main(cfg: PersonalizeConfig, base: Base, sample_fn: Callable[..., Tensor] | None = None) -> Path:
    """Train the concept through the configured stages; returns the concept file's path."""
    # -- setup: one seed for every draw, a frozen base, inputs checked before any work ------------
    main_proc = distributed.is_main_process()
    world = distributed.current(cfg.device)  # None unless launched by torchrun (train/distributed.py)
    g = torch.Generator(torch.device(cfg.device))
    seed_everything(cfg.seed, g)
    cache = LatentCache(cfg.work / "cache")
    _check_sampler(cfg, sample_fn)
    _freeze(base)
    tokens = add_tokens(base.t5, base.tokenizer, cfg.tokens())  # embeddings zero-initialized
    with base.t5.token_embedding.register_forward_hook(tokens.hook):  # the T5 reads the trained rows
        check_inputs(cfg, base, world)
        ckpt = resume_point(cfg)

        if world:  # the DiT is never whole on a device: rank 0's host copy's whole reads, shard, the caches
            dit_key = distributed.from_main(lambda: weights_digest(base.dit, cfg.device))  # as 1 process
            identity, growth = _adapter(cfg, base, tokens, ckpt, world)
            distributed.shard(base.dit, world)
            cuda = [torch.cuda.current_device()] if torch.device(cfg.device).type == "cuda" else []
            with distributed.base_only(base.dit), torch.random.fork_rng(devices=cuda):  # RNG: as 1 process
                latents, priors = _caches(cfg, base, sample_fn, distributed.SharedCache(cache.folder, world),
                                          dit_key)
        else:
            latents, priors = _caches(cfg, base, sample_fn, cache)
            identity, growth = _adapter(cfg, base, tokens, ckpt)
        if cfg.compile:  # after the LoRA is in, so the compiled blocks hold it, and after the caches: their
            base.dit.compile_blocks()  # sampling would use up dynamo's 8 recompiles before training starts
        start = (ckpt.stage, ckpt.step) if ckpt else (0, 0)
        log = LossLog(cfg.work / "loss.tsv", cfg.loss_bins, main_proc, until=start)

        # -- loop: the stages, one loop in two configurations (each builds its own optimizer) ------
        for stage in cfg.stages:
            if ckpt is not None and (ckpt.stage, ckpt.step) >= (stage, cfg.steps(stage)):
                continue  # finished before the interruption
            prior = priors.get(cfg.text_stage(stage))
            data = build_stage_data(cfg, base, stage, *latents[stage], prior, tokens)
            resume = ckpt if ckpt is not None and ckpt.stage == stage else None
            run_stage(cfg, base, data, tokens, stage, g, resume, log, sample_fn, world, growth)

        # -- write: the concept file ---------------------------------------------------------------
        with distributed.full_adapters(base.dit) if world else contextlib.nullcontext():
            concept = make_concept(cfg, base, tokens, identity)
        if main_proc:
            save_concept(cfg.out, concept)
        write_token_rows(base.t5, tokens.rows())  # the caller's T5 knows the trained tokens without the hook
    return Path(cfg.out)


def _caches(cfg: PersonalizeConfig, base: Base, sample_fn: Callable[..., Tensor] | None, cache: LatentCache,
            dit_key: str | None = None) -> tuple[dict, dict]:
    """Videos -> cached latents, and prior preservation from the base model (no adapter): each stage's
    (singles, pairs) latents and each text stage's prior set."""
    videos, frames = read_videos(cfg, base.config)
    companions = companion_videos(cfg, base, frames, tuple(videos[0].shape[2:]), sample_fn, cache, dit_key)
    latents = {s: stage_latents(cfg, base, videos, frames, s, cache, companions) for s in cfg.stages}
    return latents, prior_latents(cfg, base, latents, sample_fn, cache, dit_key)


def _adapter(cfg: PersonalizeConfig, base: Base, tokens: AddedTokens, ckpt: Checkpoint | None,
             world: distributed.World | None = None) -> tuple[BaseIdentity, AdapterGrowth | None]:
    """The adapter (one shared basis for every concept), restored when resuming; then what reads the base
    weights whole, before FSDP2 leaves each rank 1/N of the DiT: the base identity, the blow-up bound.
    Under torchrun only rank 0's DiT holds values (the others' is on the meta device, see
    distributed.shard): rank 0 reads, every rank gets its answers."""
    _add_adapter(cfg, base.dit)
    if world:
        distributed.redraw_adapter(base.dit, cfg.name, cfg.seed, cfg.device)  # as on cfg.device
    if ckpt is not None:
        load_adapter_state(cfg, base.dit, tokens, ckpt.params)
    if not world:
        return base_identity(base.dit, base.name), None
    identity = distributed.from_main(lambda: base_identity(base.dit, base.name))
    return identity, distributed.ShardedGrowth(base.dit, cfg.name)  # fp8: whole weights


def _check_sampler(cfg: PersonalizeConfig, sample_fn: Callable[..., Tensor] | None) -> None:
    if cfg.prior_count and sample_fn is None:
        raise ValueError("prior preservation needs a sampler (sample_fn); pass one or set prior_count 0")
    if cfg.preview_every and sample_fn is None:
        raise ValueError("previews need a sampler (sample_fn); pass one or set preview_every 0")


def _freeze(base: Base) -> None:
    base.t5.requires_grad_(False).eval()
    base.vae.requires_grad_(False).eval()
    base.dit.requires_grad_(False)


def check_inputs(cfg: PersonalizeConfig, base: Base, world: distributed.World | None = None) -> None:
    """Fail before any work: existing output (but the one `--stage 1` wrote, which `--stage 2` replaces),
    prompts without their tokens, too small a batch for the processes."""
    if world:
        distributed.check(cfg, world, base.dit)
    if Path(cfg.out).exists() and not cfg.force and not replaces_stage1(cfg):
        raise ValueError(f"{cfg.out} exists; pass --force to overwrite it, or choose another --out")
    if cfg.expert != "both" and base.config.experts == 1:
        raise ValueError(f"--expert {cfg.expert}: base {base.name} has one DiT; --expert picks one of a "
                         "two-expert base's (Wan 2.2 A14B) experts, leave it out here")
    check_prompts(cfg, base)
    frames, size = check_clips(cfg, base.config)
    check_memory(distributed.per_device(cfg, world) if world else cfg, base.config, frames, size)


def _add_adapter(cfg: PersonalizeConfig, dit: nn.Module) -> None:
    torch.manual_seed(cfg.seed)  # the LoRA's initial A factors
    inject_lora(dit, expert_targets(cfg, dit), cfg.rank, name=cfg.name)
    dit.gradient_checkpointing = cfg.grad_checkpointing
    dit.train()


def expert_targets(cfg: PersonalizeConfig, dit: nn.Module) -> tuple[str, ...]:
    """The LoRA target patterns inside the experts that train (`cfg.expert`) of a two-expert DiT, whose layers
    sit under `high.` / `low.` (model/experts.py); the patterns themselves for a one-DiT base."""
    if not hasattr(dit, "boundary"):
        return tuple(cfg.targets)
    prefix = {"both": r"(high|low)\.", "high": r"high\.", "low": r"low\."}[cfg.expert]
    return tuple(prefix + pattern for pattern in cfg.targets)


def make_concept(cfg: PersonalizeConfig, base: Base, tokens: AddedTokens, identity: BaseIdentity) -> Concept:
    prompts = {}
    for i, c in enumerate(cfg.concepts):
        suffix = "" if len(cfg.concepts) == 1 else f".{i}"
        prompts[f"static{suffix}"] = c.prompt
        prompts[f"dynamic{suffix}"] = c.motion_prompt
    return concept_from_model(base.dit, cfg.name, identity, adapter=cfg.name,
                              targets=expert_targets(cfg, base.dit), tokens=tokens.state(), prompts=prompts,
                              train_config=cfg.record())


# ------------------------------------------------------------------------------------------ the loop


def run_stage(cfg: PersonalizeConfig, base: Base, data: StageData, tokens: AddedTokens, stage: int,
              g: torch.Generator, resume: Checkpoint | None, log: LossLog,
              sample_fn: Callable[..., Tensor] | None, world: distributed.World | None = None,
              growth: AdapterGrowth | None = None) -> None:
    """The loop: draw, forward, backward, clip, step; log, preview, checkpoint. With a `world`, this rank
    runs its share of each batch (train/distributed.py) and the checkpoints are DCP folders."""
    main_proc = distributed.is_main_process()
    lora, emb = trained_params(cfg, base.dit, tokens, stage)
    optimizer = build_optimizer(cfg, lora, emb)
    start = (distributed.start_sharded_stage if world else start_stage)(cfg, stage, optimizer, g, resume)
    share = world.share(cfg.batch_size) if world else None
    growth = growth or AdapterGrowth(base.dit, cfg.name)
    shift = cfg.stage_shift(base.config.sample_shift, stage)
    cuda = g.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    steps = cfg.steps(stage)
    bar = tqdm(range(start, steps), desc=f"stage {stage}", initial=start, total=steps,
               disable=not (cfg.progress and main_proc))
    for step in bar:
        with autocast:
            out = loss_step(cfg, base.dit, base.t5, data, g, shift, share)
        shown = distributed.gather(out, share, cfg.batch_size) if world else out  # the whole batch's
        log.add(shown, _descend(cfg, optimizer, lora + emb, out.loss, growth, stage, step, world, shown.loss))
        done = step + 1
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == steps:
            row = log.flush(stage, done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", concept=f"{row['concept']:.4f}")
        if cfg.preview_every and done % cfg.preview_every == 0:  # every rank samples (a sharded DiT)
            write_preview(cfg.work / "previews" / f"stage{stage}-step{done:06d}.gif", cfg, base, data, stage,
                          sample_fn, write=main_proc)
            if world:
                distributed.reshard(base.dit)  # the sampling left FSDP's root gathered
        if done % cfg.checkpoint_every == 0 or done == steps:
            save = distributed.save_stage_checkpoint if world else save_stage_checkpoint  # DCP: every rank
            save(cfg, base.dit, tokens, optimizer, g, stage, done)
    bar.close()


def _descend(cfg: PersonalizeConfig, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             loss: Tensor, growth: AdapterGrowth, stage: int, step: int,
             world: distributed.World | None = None, total: Tensor | None = None) -> float:
    """Backward, clip, step; returns the gradient norm. A NaN or inf stops the run before the step, an
    adapter blown up (BLOWUP) after it, before anything of the step is written. With a `world`, `loss` is
    this rank's share of the batch and `total` the whole batch's (every rank stops together)."""
    folder = cfg.work / "checkpoints"
    total = loss if total is None else total
    if not torch.isfinite(total):
        raise Diverged(_diverged(f"the loss became {float(total.detach())}", stage, step, folder))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world:
        grad_norm = distributed.clip_grad_norm(params, cfg.grad_clip)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True))
    if not math.isfinite(grad_norm):
        raise Diverged(_diverged(f"the gradient norm became {grad_norm}", stage, step, folder))
    optimizer.step()
    bound, layer = growth()
    if not bound <= BLOWUP:
        raise Diverged(_diverged(f"the adapter blew up (its update bound is {bound:.3g} x the base weights', "
                                 f"limit {BLOWUP:g}; largest in {layer})", stage, step, folder))
    return grad_norm


def _diverged(what: str, stage: int, step: int, folder: Path) -> str:
    last = latest_checkpoint(folder)
    if last is None:
        return (f"{what} at stage {stage} step {step + 1}; training stopped before any checkpoint was "
                "written: run again with a lower --lr")
    return (f"{what} at stage {stage} step {step + 1}; training stopped, and the last checkpoint, {last}, is "
            "from before: continue from it with --resume and a lower --lr (a resume may change --lr, "
            "--token-lr, --steps1/--steps2 and the checkpoint and preview cadence)")
