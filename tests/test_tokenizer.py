"""Sentencepiece tokenizer wrapper: encoding, added concept tokens, errors, saving the added list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.tokenizer import Tokenizer


def test_round_trip(sp_model_path):
    tok = Tokenizer(sp_model_path)
    texts = ["a red square moving left on grey background.", "the blue star is spinning slowly."]
    ids, mask = tok.encode(texts, 32)
    assert [tok.decode(row) for row in ids] == texts
    assert mask.sum(1).tolist() == [len(tok.tokenize(t)) + 1 for t in texts]


def test_encode_pads_and_appends_eos(sp_model_path):
    tok = Tokenizer(sp_model_path)
    ids, mask = tok.encode(["a red square", "blue"], 12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m in zip(ids, mask, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
        assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
    assert tok.eos_id == 1 and tok.pad_id == 0  # T5's ids


def test_truncation_keeps_eos(sp_model_path):
    tok = Tokenizer(sp_model_path)
    text = "a red square moving left on grey background with a blue star spinning"
    full = tok.tokenize(text)
    ids, mask = tok.encode([text], 5)
    assert mask.all() and ids[0].tolist() == full[:4] + [tok.eos_id]
    with pytest.raises(ValueError, match="max_length 5"):
        tok.encode([text], 5, truncate=False)


def test_added_tokens_are_single_ids_after_sp_vocab(sp_model_path):
    tok = Tokenizer(sp_model_path)
    v, u = tok.add_tokens(["[v]", "[u]"])
    assert (v, u) == (tok.sp_size, tok.sp_size + 1) and tok.vocab_size == tok.sp_size + 2
    ids = tok.tokenize("a [v] square in [u] motion")
    assert ids.count(v) == 1 and ids.count(u) == 1
    plain = tok.tokenize("a square in motion")
    assert [i for i in ids if i not in (v, u)] == plain  # the rest goes through sentencepiece unchanged
    assert tok.tokenize("[v][u]") == [v, u]
    assert tok.decode(ids) == "a [v] square in [u] motion"


def test_add_tokens_is_idempotent(sp_model_path):
    tok = Tokenizer(sp_model_path)
    first = tok.add_tokens(["[v]", "[u]"])
    assert tok.add_tokens(["[u]", "[v2]", "[v]"]) == [first[1], first[1] + 1, first[0]]
    assert tok.vocab_size == tok.sp_size + 3
    assert tok.tokenize("[v2] [v]") == [first[1] + 1, first[0]]  # "[v2]" is not split as "[v" ...


def test_add_tokens_rejects_whitespace(sp_model_path):
    with pytest.raises(ValueError, match="without whitespace"):
        Tokenizer(sp_model_path).add_tokens(["my token"])


def test_first_added_id(sp_model_path):
    tok = Tokenizer(sp_model_path, first_added_id=500)
    assert tok.add_tokens(["[v]"]) == [500] and tok.vocab_size == 501
    with pytest.raises(ValueError, match="collide"):
        Tokenizer(sp_model_path, first_added_id=3)


def test_added_tokens_json_round_trip(sp_model_path):
    tok = Tokenizer(sp_model_path)
    tok.add_tokens(["[v]", "[u]", "[v2]"])
    fresh = Tokenizer(sp_model_path)
    assert fresh.load_added_tokens(tok.added_tokens_json()) == [tok.sp_size, tok.sp_size + 1, tok.sp_size + 2]
    assert fresh.added_tokens == tok.added_tokens
    text = "a [v] star [v2] in [u] motion"
    assert torch.equal(fresh.encode([text], 16)[0], tok.encode([text], 16)[0])


def test_load_added_tokens_refuses_other_ids(sp_model_path):
    tok = Tokenizer(sp_model_path)
    tok.add_tokens(["[v]"])
    other = Tokenizer(sp_model_path)
    other.add_tokens(["[x]"])
    with pytest.raises(ValueError, match="recorded with id"):
        other.load_added_tokens(tok.added_tokens_json())
    assert other.added_tokens == {"[x]": tok.sp_size}  # unchanged by the failed load


def test_missing_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentencepiece model file not found"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer(tmp_path)  # a directory without one


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {}}')
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_directory_with_spiece_model(sp_model_path):
    from pathlib import Path

    tok = Tokenizer(Path(sp_model_path).parent)
    assert tok.path.name == "spiece.model"


def test_a_word_the_tiny_tokenizer_cannot_read_is_named():
    tok = Tokenizer(Path(__file__).resolve().parents[1] / "assets" / "tiny" / "tokenizer.model")
    assert tok.unreadable_words("a [v] square moves [u] on a gray background") == []
    assert tok.unreadable_words("a [v] sprite on a gray background") == ["sprite"]
