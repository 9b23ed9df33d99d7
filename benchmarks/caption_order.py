"""Not a timing: does a tiny base read word order? x0 loss on two-object toy clips with their caption and
with the caption's two objects swapped (same noise). A base that places objects by the caption's order
loses much more with the swapped caption near pure noise; one that reads the caption as a bag of words
loses the same. At t = 1, 64 clips: `assets/tiny` 0.111 / 0.951; the DiT-stage base before the layout
stage (git show d733a8a:assets/tiny) 0.462 / 0.462.

    python -m benchmarks.caption_order --base assets/tiny
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from model.base import Base
from model.flow import add_noise, prediction_loss_per_sample
from toyworld.pretrain import caption_length
from toyworld.world import Scenes, ToyWorldConfig, generate_batch, scene_captions, to_model_video
from weights.base import load_base


def swapped_captions(scenes: Scenes) -> list[str]:
    """The world's captions of two-object `scenes` with the two objects named in the other order."""
    flip = {k: getattr(scenes, k)[:, ::-1] for k in ("colour", "shape", "motion")}
    return scene_captions(dataclasses.replace(scenes, **flip))


@torch.no_grad()
def order_losses(base: Base, clips: int, seed: int, times: list[float]
                 ) -> list[tuple[float, float, float, float]]:
    """(t, loss with the caption, loss with it swapped, share of clips the swap hurts) per time."""
    batch = generate_batch(clips, seed=seed, cfg=ToyWorldConfig(two_object_prob=1.0))
    tok = base.tokenizer
    length = caption_length(tok, base.config.t5.max_length)
    contexts = []
    for captions in (batch.captions, swapped_captions(batch.scenes)):
        ids, mask = tok.encode(captions, length)
        contexts.append((base.t5(ids, mask.bool()), mask.bool()))
    x0 = base.vae.encode(to_model_video(batch.video))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t_ in times:
        t = torch.full((clips,), t_)
        x_t = add_noise(x0, eps, t)
        right, swapped = (
            prediction_loss_per_sample(base.dit(x_t, t, ctx, context_mask=mask), x_t, x0, eps, t,
                                       base.dit.cfg.prediction)
            for ctx, mask in contexts)
        rows.append((t_, right.mean().item(), swapped.mean().item(), (swapped > right).float().mean().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="assets/tiny", help="a tiny base: a folder, or tiny (assets/tiny)")
    parser.add_argument("--clips", type=int, default=64, help="two-object training-split clips")
    parser.add_argument("--seed", type=int, default=99, help="clips and noise seed")
    parser.add_argument("--times", type=float, nargs="+", default=[0.5, 0.9, 0.99, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.base, device="cpu")
    print(f"{args.base}: x0 loss on {args.clips} two-object clips (seed {args.seed})")
    print("| t | caption | objects swapped | clips the swap hurts |\n|---|---|---|---|")
    for t, right, swapped, hurt in order_losses(base, args.clips, args.seed, args.times):
        print(f"| {t:g} | {right:.4f} | {swapped:.4f} | {hurt:.2f} |")


if __name__ == "__main__":
    main()
