"""Shared test fixtures."""

from __future__ import annotations

import random

import pytest
import torch

from model.tokenizer import train_tokenizer

# Test models are tiny: one thread runs them fastest, and it keeps the suite's timing independent of
# how many cores CI has and what else runs beside it.
torch.set_num_threads(1)

_WORDS = (
    "a the of in on over with and is red green blue yellow purple orange white black grey square circle "
    "triangle star ring cross moving left right up down bouncing spinning pulsing circling zigzagging "
    "background dark room sea grassy field snow camera static pans slowly quickly small large striped "
    "dotted sprite figure eight hop spin motion video"
).split()


def toy_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Short pseudo-captions over a toy-world word list (deterministic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    """Path (str) of a tiny unigram sentencepiece model with T5's ids (pad 0, eos 1, unk 2, no bos).

    Trained once per test session in well under a second; about 100 pieces, most words of the toy
    vocabulary are single pieces. Usage: `def test_x(sp_model_path): tok = Tokenizer(sp_model_path)`.
    """
    path = tmp_path_factory.mktemp("sentencepiece") / "spiece.model"
    return str(train_tokenizer(toy_sentences(), path, vocab_size=128))
