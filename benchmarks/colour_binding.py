"""Not a timing: does a tiny base put each colour on the side its caption says? Samples held-out captions
and reads the object colours from pixels, one-object clips and the objects of two-object scenes apart
(the caption's first object is the left one, so a scene drawn with its sides swapped gets both wrong).

    python -m benchmarks.colour_binding --base assets/tiny --world-seed 777 --two-object-prob 1
"""

from __future__ import annotations

import argparse

import torch

from model.tokenizer import Tokenizer
from sample.evaluate_base import generate, to_uint8
from sample.instruments import attribute_accuracy
from train.pretrain import caption_length
from train.toyworld import BACKGROUNDS, COLOURS, MOTIONS, ToyWorldConfig, generate_batch
from weights.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="assets/tiny", help="a tiny base folder")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--world-seed", type=int, default=12345, help="12345: setseq pretrain's own set")
    parser.add_argument("--two-object-prob", type=float, default=0.3, help="0.3: the training world's")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_checkpoint(args.base)
    batch = generate_batch(args.prompts, seed=args.world_seed, split="heldout",
                           cfg=ToyWorldConfig(two_object_prob=args.two_object_prob))
    tokenizer = Tokenizer(base.tokenizer_path)
    length = caption_length(tokenizer, base.cfg.t5.max_length)

    def encode(texts: list[str]):
        ids, mask = tokenizer.encode(texts, length)
        return base.t5(ids, mask.bool()), mask.bool()

    with torch.no_grad():
        reference = torch.from_numpy(batch.video[:1]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        latent_shape = tuple(base.vae.encode(reference).shape[1:])
        context, mask = encode(batch.captions)
        videos = to_uint8(generate(base.dit, base.vae, latent_shape, context, mask, encode([""]),
                                   guidance=args.guidance, steps=base.cfg.sample_steps,
                                   shift=base.cfg.sample_shift, seed=args.seed))
    intended = [c.attributes() for c in batch.clips()]
    single = [i for i, w in enumerate(intended) if len(w["objects"]) == 1]
    print(f"{args.base}: {args.prompts} held-out prompts, world seed {args.world_seed}, "
          f"guidance {args.guidance}")
    print("| clips | objects | colour right | chance (uniform) |\n|---|---|---|---|")
    if single:
        acc = attribute_accuracy([videos[i] for i in single], [intended[i] for i in single], BACKGROUNDS,
                                 COLOURS, MOTIONS)["colour"]
        print(f"| one-object | {acc['n']} | {acc['accuracy']:.2f} | {acc['uniform']:.2f} |")
    pairs = attribute_accuracy(list(videos), intended, BACKGROUNDS, COLOURS, MOTIONS)["pair_colour"]
    if pairs["n"]:  # a scene drawn with its sides swapped scores 0 here, one drawn at random 0.5
        print(f"| two-object | {pairs['n']} | {pairs['accuracy']:.2f} | {pairs['uniform']:.2f} "
              "(sides at random: 0.50) |")


if __name__ == "__main__":
    main()
