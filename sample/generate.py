"""Generation with concepts: a base model, concept files applied as adapters, a prompt -> a video.

    base parts + concepts ──add_concept──► LoRA adapters in the DiT, concept tokens in the tokenizer,
                                           their input embeddings written into the T5 table
    prompt ──tokenizer──► ids ──T5──► context ─┐
    seeds ──► noise (B, C, T', H', W') ────────┴─ sample_latents (CFG, self-cond) ──► latents ──VAE──► video

Several concepts mix post hoc: each concept file is its own adapter (its ΔW adds to the others')
and brings its own tokens; a file trained jointly on several concepts carries all their tokens in
one adapter. Identity (alpha) and motion (beta) scales are set per adapter: alpha = beta = 0 gives
the base model exactly. Editing is reprompting: the same concept tokens in a new prompt.

sample/ imports model/ and lora/ only: the caller loads the base (weights.base.load_base) and hands
the bundle to `Pipeline.of`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lora.concept import Concept, apply_concept, base_identity, load_concept
from lora.inject import set_scales
from lora.regions import box_weights, check_box, regions
from lora.tokens import TOKEN_LIKE, add_token_rows, write_token_rows
from model.base import Base
from model.config import ModelConfig
from sample.sampler import sample_latents


@dataclass
class Pipeline(Base):
    """A base model (frozen, in eval mode) plus the concepts applied to it."""

    concepts: dict[str, Concept] = field(default_factory=dict)  # adapter name -> concept

    def __post_init__(self) -> None:
        for module in (self.dit, self.vae, self.t5):
            module.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        # the text encoder's: under idle-expert offload (ExpertPair.offload_idle) one DiT expert is on the CPU
        return next(self.t5.parameters()).device

    @classmethod
    def of(cls, base: Base) -> Pipeline:
        return cls(base.config, base.dit, base.vae, base.t5, base.tokenizer, base.name)

    def concept_tokens(self) -> dict[str, str]:
        """Added token -> the adapter whose concept defines it."""
        return {tok: name for name, c in self.concepts.items() for tok in c.tokens}


# ---------------------------------------------------------------------------------------- concepts


def _adapter_name(concept: Concept, taken: dict[str, Concept]) -> str:
    """The concept's name made a valid, unused adapter name (no '.'; a suffix when taken)."""
    stem = re.sub(r"[^\w-]", "_", concept.name) or "concept"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def add_concept(pipe: Pipeline, concept: Concept, *, identity: float = 1.0, motion: float = 1.0) -> str:
    """Apply a concept as its own adapter at scales (identity, motion), add its tokens to the tokenizer
    and write their embeddings into the T5 table. Refuses a concept for another base model and a token
    another applied concept already defines. Returns the adapter name."""
    defined = pipe.concept_tokens()
    clash = sorted(t for t in concept.tokens if t in defined)
    if clash:
        other = pipe.concepts[defined[clash[0]]].name
        raise ValueError(f"concepts {other!r} and {concept.name!r} both define token(s) {clash}; concepts "
                         "mixed in one video need distinct tokens (personalize them with e.g. token '[v2]' / "
                         "motion_token '[u2]' in a --config [[concepts]] table, or train them jointly)")
    adapter = _adapter_name(concept, pipe.concepts)
    apply_concept(pipe.dit, concept, expected_base=base_identity(pipe.dit, pipe.name), adapter=adapter,
                  identity=identity, motion=motion)
    pipe.concepts[adapter] = concept
    if concept.tokens:  # their ids in the tokenizer, their embeddings in the T5 table
        ids = add_token_rows(pipe.t5, pipe.tokenizer, list(concept.tokens))
        write_token_rows(pipe.t5, dict(zip(ids, concept.tokens.values(), strict=True)))
    return adapter


def read_concept_file(path: Path) -> Concept:
    """load_concept, its errors naming the --concept file: read before any base weights load."""
    try:
        return load_concept(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--concept {str(path)!r}: no such concept file") from None
    except ValueError as err:
        raise ValueError(f"--concept {str(path)!r}: {err}") from None


def add_concept_file(pipe: Pipeline, path: Path, concept: Concept, *, identity: float = 1.0,
                     motion: float = 1.0) -> str:
    """Apply the concept read from `path` (add_concept); returns a line describing it. One that does not fit
    the base raises an error that names the file."""
    try:
        adapter = add_concept(pipe, concept, identity=identity, motion=motion)
    except ValueError as err:
        raise ValueError(f"--concept {str(path)!r}: {err}") from None
    tokens = " ".join(concept.tokens) or "no tokens"
    return (f"concept {adapter} ({path}): rank {concept.rank}, {len(concept.modules)} layers, {tokens}, "
            f"identity {identity:g}, motion {motion:g}")


def set_concept_scales(pipe: Pipeline, adapter: str, identity: float, motion: float) -> None:
    if adapter not in pipe.concepts:
        raise ValueError(f"no concept {adapter!r} is applied; applied: {list(pipe.concepts)}")
    set_scales(pipe.dit, identity, motion, concept=adapter)


def check_prompt_tokens(pipe: Pipeline, prompt: str) -> None:
    """A bracketed word in the prompt must be a token some applied concept (or the base) defines."""
    known = set(pipe.tokenizer.added_tokens)
    unknown = [t for t in dict.fromkeys(TOKEN_LIKE.findall(prompt)) if t not in known]
    if unknown:
        have = ", ".join(sorted(known)) or "none (no --concept given)"
        raise ValueError(f"prompt uses token(s) {', '.join(unknown)} that no applied concept defines; "
                         f"defined tokens: {have}")


# ---------------------------------------------------------------------------------------- sampling


@dataclass
class GenerateConfig:
    """Sampling settings; None = the base model's own default (ModelConfig.guidance, sample_steps, ...)."""

    frames: int
    size: tuple[int, int]  # (H, W) pixels
    steps: int | None = None
    guidance: float | None = None  # the paper samples at 8; a base model names its own
    shift: float | None = None
    seed: int = 0
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    self_cond: bool | None = None  # None = when the DiT has self-conditioning
    # Two-expert bases (Wan 2.2 A14B): guidance of the low-noise stage; `guidance` is the high-noise stage's.
    low_noise_guidance: float | None = None
    # Concept adapter name -> box (x0, y0, x1, y1) in fractions of the frame: that concept's adapters act
    # only there (lora/regions.py); concepts not named act everywhere.
    regions: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def resolved(self, cfg: ModelConfig) -> GenerateConfig:
        out = GenerateConfig(
            frames=self.frames, size=tuple(self.size), seed=self.seed, negative_prompt=self.negative_prompt,
            steps=cfg.sample_steps if self.steps is None else self.steps,
            guidance=cfg.guidance if self.guidance is None else self.guidance,
            shift=cfg.sample_shift if self.shift is None else self.shift,
            self_cond=cfg.dit.self_cond if self.self_cond is None else self.self_cond,
            low_noise_guidance=self._low_noise_guidance(cfg),
            regions={name: check_box(box) for name, box in self.regions.items()})
        for box in out.regions.values():
            box_weights(box, out.token_grid(cfg))  # a box between token centres: refused before sampling
        if out.steps < 1:
            raise ValueError(f"steps must be >= 1, got {out.steps}")
        for name in ("guidance", "low_noise_guidance"):
            if (value := getattr(out, name)) is not None and not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{name} must be a finite number >= 1 (1 = no classifier-free guidance), "
                                 f"got {value}")
        if out.self_cond and not cfg.dit.self_cond:
            raise ValueError(f"self-conditioning asked, but base {cfg.name} has no self-conditioning input")
        return out

    def token_grid(self, cfg: ModelConfig) -> tuple[int, int, int]:
        """(T', H', W') DiT tokens of this clip on base `cfg`."""
        latent = cfg.latent_shape(self.frames, self.size)[1:]
        return tuple(n // p for n, p in zip(latent, cfg.dit.patch, strict=True))

    def _low_noise_guidance(self, cfg: ModelConfig) -> float | None:
        """The low-noise stage's guidance: given, else the base's own, else the high-noise stage's; None for a
        one-DiT base (and an error when one was asked of it)."""
        if cfg.boundary is None:
            if self.low_noise_guidance is not None:
                raise ValueError(f"low-noise guidance asked, but base {cfg.name} has one DiT "
                                 "(no expert switch)")
            return None
        if self.low_noise_guidance is not None:
            return self.low_noise_guidance
        if self.guidance is not None:  # the user set one guidance: it rules both stages, as in diffusers
            return self.guidance
        return cfg.guidance if cfg.low_noise_guidance is None else cfg.low_noise_guidance


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_prompts(pipe: Pipeline, texts: list[str]) -> tuple[Tensor, Tensor]:
    """(context (B, L, D) float32, mask (B, L) bool); a prompt longer than the T5 context is an error."""
    ids, mask = pipe.tokenizer.encode(texts, pipe.config.t5.max_length, truncate=False)
    ids, mask = ids.to(pipe.device), mask.to(pipe.device)
    return pipe.t5(ids, mask).float(), mask


def word_positions(pipe: Pipeline, prompt: str, adapters: list[str]) -> dict[str, Tensor]:
    """Adapter -> (N,) bool: its concept's words in the encoded prompt, the span from its first token to
    its last ("[v] square moves [u]"), which a region confines. The span, not the tokens alone: on the
    toy base, confining [v] and [u] alone left the added object wrong in 1 of 4 samples, the span in none."""
    ids, _ = pipe.tokenizer.encode([prompt], pipe.config.t5.max_length, truncate=False)
    out = {}
    for name in adapters:
        concept = pipe.concepts.get(name)
        if concept is not None and concept.tokens:
            own = torch.tensor([pipe.tokenizer.added_tokens[t] for t in concept.tokens])
            at = torch.isin(ids[0], own).nonzero().flatten()
            if len(at):
                out[name] = torch.zeros(ids.shape[1], dtype=torch.bool)
                out[name][int(at.min()):int(at.max()) + 1] = True
    return out


def _confined(pipe: Pipeline, prompt: str, gen: GenerateConfig):
    """gen.regions in force while sampling (lora/regions.py), their weights on the DiT's device once, not
    moved at every layer and step; no region: nothing to enter."""
    if not gen.regions:
        return contextlib.nullcontext()
    grid = gen.token_grid(pipe.config)
    weights = {name: box_weights(box, grid).to(pipe.device) for name, box in gen.regions.items()}
    return regions(pipe.dit, weights, word_positions(pipe, prompt, list(gen.regions)))


@torch.no_grad()
def generate_batch(pipe: Pipeline, prompt: str, gen: GenerateConfig, seeds: Sequence[int], *,
                   progress: bool = False, image: Tensor | None = None) -> list[Tensor]:
    """One video per seed for `prompt`, sampled as one batch: (3, T, H, W) float32 in [-1, 1] on the CPU
    each. Seed s's noise is drawn alone from torch.Generator().manual_seed(s) on the CPU, so a video
    depends neither on its batch nor on the device. image (3, 1, H, W) in [-1, 1]: the first frame
    (image-to-video, Wan 2.2 TI2V): its latent is kept as frame 0 through sampling, at flow time 0."""
    gen = gen.resolved(pipe.config)
    check_prompt_tokens(pipe, prompt)
    check_prompt_tokens(pipe, gen.negative_prompt)
    shape = pipe.config.latent_shape(gen.frames, gen.size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    device, dtype = pipe.device, next(pipe.dit.parameters()).dtype
    with _autocast(device, dtype):
        cond = encode_prompts(pipe, [prompt] * len(seeds))
        uncond = encode_prompts(pipe, [gen.negative_prompt])
        vae_dtype = next(pipe.vae.parameters()).dtype
        first = None if image is None else pipe.vae.encode(image[None].to(device, vae_dtype)).float()
        with _confined(pipe, prompt, gen):
            z = sample_latents(pipe.dit, noise.to(device), cond, uncond, steps=gen.steps,
                               guidance=gen.guidance, shift=gen.shift, self_cond=gen.self_cond,
                               progress=progress, low_noise_guidance=gen.low_noise_guidance,
                               first_frame=first)
        video = pipe.vae.decode(z.to(vae_dtype), chunk="auto")  # (B, 3, T, H, W); long clips stream
    return [v.float().cpu() for v in video]


def generate(pipe: Pipeline, prompt: str, gen: GenerateConfig, *, progress: bool = True,
             image: Tensor | None = None) -> Tensor:
    """One video for `prompt`: (3, T, H, W) float32 in [-1, 1] on the CPU. The seed fixes it. image: its
    first frame (see generate_batch)."""
    return generate_batch(pipe, prompt, gen, [gen.seed], progress=progress, image=image)[0]


__all__ = ["Pipeline", "GenerateConfig", "add_concept", "set_concept_scales", "check_prompt_tokens",
           "encode_prompts", "generate_batch", "generate"]
