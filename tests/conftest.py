"""Shared test fixtures."""

from __future__ import annotations

import json
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


# A tiny CLIP (clip_folder): byte-level vocab (no merges), 32-pixel images of 8-pixel patches.
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, vocab_size=514, eos_token_id=513, bos_token_id=512,
                 pad_token_id=513, hidden_act="quick_gelu")
CLIP_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, hidden_act="quick_gelu")


def byte_vocab() -> dict[str, int]:
    """256 byte symbols, the same with the word-end mark, then the two specials: a valid CLIP BPE vocab
    with no merges (every byte is its own token)."""
    from model.clip_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return vocab


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel, its tokenizer files and a preprocessor config, as save_pretrained writes."""
    transformers = pytest.importorskip("transformers")
    from model.clip import OPENAI_MEAN, OPENAI_STD

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF's init leaves some norms at exactly 1/0; random ones test the wiring
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(byte_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_resize": True,
         "do_center_crop": True, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
         "resample": 3, "image_processor_type": "CLIPImageProcessor"}))
    return path, model


@pytest.fixture(scope="session")
def toy_clip():
    """A one-object toy clip (17 x 64 x 64) that moves."""
    from toyworld.world import generate

    clips = generate(40, seed=0)
    moving = ("left", "right", "clockwise")
    return next(c for c in clips if len(c.objects) == 1 and c.objects[0].motion in moving)
