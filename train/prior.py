"""Prior preservation (paper §3.4.1): the base model's OWN generations for generic two-part prompts
("appearance. motion."), generated once with the adapter absent, cached on disk, and mixed into
every training batch with a weight, so the adapter keeps what the base model already does.

    prompt "A man in a blue t-shirt. He is walking in a park."
        stage 1: static part "A man in a blue t-shirt."  -> 1-frame latent (an image)
        stage 2: the whole prompt                        -> clip latent of the training clip's shape

The sampler is passed in (`sample_fn`, e.g. sample.sampler.sample_latents): train/ does not import
sample/, and a test can hand in any function of the same signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import LatentCache

DEFAULT_PROMPTS = (
    "A man in a blue t-shirt. He is walking in a park.",
    "A woman in a red dress. She is dancing on a stage.",
    "A brown dog on a lawn. It runs toward the camera.",
    "A red circle on a gray background. It moves left.",
    "A campfire on a beach at night. The flames flicker in the wind.",
    "Ocean waves near a rocky shore. The waves roll in and break.",
    "A yellow taxi on a city street. It drives past slowly.",
    "A child in a green jacket. He is jumping on the spot.",
)


def split_prompt(prompt: str) -> tuple[str, str]:
    """(static, full): the first sentence is the appearance, the whole text adds the motion.
    "STATIC | FULL" names both explicitly (a world whose captions are single sentences, e.g. the toy
    world's "a red circle | a red circle moves left on a blue background")."""
    static, bar, full = prompt.partition(" | ")
    if bar:
        return static.strip(), full.strip()
    head, dot, _ = prompt.strip().partition(". ")
    if not dot:
        raise ValueError(f"prior prompt {prompt!r} needs two parts, 'appearance. motion.' "
                         "(e.g. 'A man in a blue t-shirt. He is walking in a park.')")
    return head + ".", prompt.strip()


@dataclass
class PriorSet:
    """Generated latents of one stage and the prompt text of each."""

    latents: Tensor  # (N, C, T', H', W')
    texts: list[str]


@torch.no_grad()
def generate_prior(
    dit: nn.Module,
    encode_text: Callable[[list[str]], tuple[Tensor, Tensor]],
    sample_fn: Callable[..., Tensor],
    texts: list[str],
    latent_shape: tuple[int, int, int, int],
    *,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
    batch: int = 2,
) -> Tensor:
    """Latents (N, C, T', H', W') sampled from the base model for `texts`, one per text, fixed by seed.

    encode_text(texts) -> (context (B, L, D), mask (B, L)); latent_shape = (C, T', H', W').
    """
    device = next(dit.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    uncond, uncond_mask = encode_text([""])
    was_training = dit.training
    dit.eval()
    out = []
    for i in range(0, len(texts), batch):
        context, mask = encode_text(texts[i : i + batch])
        shape = (context.shape[0], *latent_shape)
        z = sample_fn(dit, shape, (context, mask), (uncond, uncond_mask), steps=steps, guidance=guidance,
                      shift=shift, generator=generator)
        out.append(z.float().cpu())
    dit.train(was_training)
    return torch.cat(out)


def prior_sets(
    dit: nn.Module,
    encode_text: Callable[[list[str]], tuple[Tensor, Tensor]],
    sample_fn: Callable[..., Tensor],
    prompts: list[str],
    shapes: dict[int, tuple[int, int, int, int]],
    *,
    cache: LatentCache,
    key: dict,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
) -> dict[int, PriorSet]:
    """The prior set of each stage in `shapes` ({stage: latent shape}), read from the cache or
    generated (call this before any adapter is injected: the generations must be the base model's)."""
    out = {}
    for stage, shape in shapes.items():
        texts = [split_prompt(p)[0 if stage == 1 else 1] for p in prompts]
        stage_key = {**key, "stage": stage, "texts": texts, "shape": list(shape), "steps": steps,
                     "guidance": guidance, "shift": shift, "seed": seed}

        def compute(texts=texts, shape=shape, stage=stage) -> dict[str, Tensor]:
            latents = generate_prior(dit, encode_text, sample_fn, texts, shape, steps=steps,
                                     guidance=guidance, shift=shift, seed=seed + stage)
            return {"latents": latents}

        out[stage] = PriorSet(cache.get(f"prior-stage{stage}", stage_key, compute)["latents"], texts)
    return out
