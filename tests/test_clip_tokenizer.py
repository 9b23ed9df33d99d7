"""CLIP BPE tokenizer: parity with HF CLIPTokenizer on a tiny learned vocab, file formats, errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from model.clip_tokenizer import BOS, EOS, WORD_END, ClipTokenizer, bytes_to_unicode

_CAPTIONS = (
    "a red square moving left on a grey background. the blue star is spinning slowly over the sea! "
    "a green circle bounces up and down in a dark room; the camera pans quickly to the right. "
    "it's a small striped triangle, we'll see it hop and spin. the the the there their then"
)
# Byte-level merges the captions never teach: multibyte letters, an emoji, punctuation, contractions,
# and repeated symbols (where the merge order matters).
_HAND_MERGES = [
    ("Ã", "©</w>"), ("Ã", "¯"), ("a", "f"), ("c", "af"), ("caf", "Ã©</w>"), ("ð", "Ł"),
    ("!", "!"), ("!!", "!</w>"), (".", "."), ("..", ".</w>"), ("'", "s</w>"), ("'", "ll</w>"),
    ("_", "_"), ("_", "_</w>"), ("a", "a"), ("aa", "a</w>"), ("1", "2"),
]

TEXTS = [
    "a red square moving left on a grey background",
    "The Quick BROWN Fox JUMPS",
    "hello!!! world... ?!?",
    "it's what we'll do, they're sure I'd've 'start",
    "1234 frames at 24fps",
    "tabs\tand\nnewlines   and\r\n spaces  ",
    "snake_case_name __init__",
    "café naïve CAFÉ Ünïcödé",
    "cafe\u0301 (decomposed accent, NFC makes it é)",
    "a dog 🐶 runs",
    "before <|endoftext|> after",
    "",
    "   ",
    "aaaa aaa aa a aaaaaaa",
    "mixed: (brackets), [x] {y} @#$% ~`",
    "the blue star is spinning slowly over the sea " * 12,  # > 77 tokens: truncated
]


def _learn_merges(text: str, n: int) -> list[tuple[str, str]]:
    """Greedy BPE training on lowercase words (ties broken by pair, for determinism)."""
    words = Counter(re.findall(r"[a-z]+|[^a-z\s]+", text.lower()))
    corpus = {tuple(w[:-1]) + (w[-1] + WORD_END,): c for w, c in words.items()}
    merges = []
    for _ in range(n):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, c in corpus.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        corpus = {_merge_word(w, best): c for w, c in corpus.items()}
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(bytes_to_unicode().values())
    merges = _learn_merges(_CAPTIONS, 80)
    merges += [m for m in _HAND_MERGES if m not in merges]
    tokens = base + [b + WORD_END for b in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _write_dir(d: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (d / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return _write_dir(tmp_path_factory.mktemp("clip"), *_vocab_and_merges())


@pytest.fixture(scope="module")
def hf_tok(clip_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(clip_dir)


def _hf_ids(hf_tok, text: str) -> list[int]:
    return hf_tok(text, truncation=True, max_length=77)["input_ids"]


def test_vocab_is_nontrivial(clip_dir):
    # The parity tests only mean something if words really merge into multi-character tokens.
    tok = ClipTokenizer.from_dir(clip_dir)
    assert tok.bpe("the") == ("the</w>",) and tok.bpe("café") == ("café</w>".encode().decode("latin-1"),)
    assert len(tok.encode(TEXTS[-1])) == 77


@pytest.mark.parametrize("text", TEXTS)
def test_matches_hf_clip_tokenizer(clip_dir, hf_tok, text):
    assert ClipTokenizer.from_dir(clip_dir).encode(text) == _hf_ids(hf_tok, text)


def test_html_entities_unescaped_like_openai(clip_dir, hf_tok):
    # OpenAI's basic_clean unescapes html (twice); HF's tokenizers-backed CLIPTokenizer does not, so
    # this is the one case where we follow OpenAI (whose tokenizer CLIP was trained with) over HF.
    tok = ClipTokenizer.from_dir(clip_dir)
    plain = tok.encode("salt & pepper")
    assert tok.encode("salt &amp; pepper") == tok.encode("salt &amp;amp; pepper") == plain
    assert tok.encode("salt & pepper") == _hf_ids(hf_tok, "salt & pepper")


def test_tokenizer_json_from_hf_save_pretrained(clip_dir, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    ours, ref = ClipTokenizer.from_dir(tmp_path), ClipTokenizer.from_dir(clip_dir)
    assert ours.vocab == ref.vocab and ours.ranks == ref.ranks
    assert [ours.encode(t) for t in TEXTS] == [_hf_ids(hf_tok, t) for t in TEXTS]


def test_tokenizer_json_with_string_merges(tmp_path):
    vocab, merges = _vocab_and_merges()
    model = {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}), encoding="utf-8")
    assert ClipTokenizer.from_dir(tmp_path).ranks == ClipTokenizer(vocab, merges).ranks


def test_truncation_keeps_eos_and_padding(clip_dir):
    tok = ClipTokenizer.from_dir(clip_dir)
    body = tok.tokenize(TEXTS[0])
    assert tok.encode(TEXTS[0], max_length=5) == [tok.bos_id, *body[:3], tok.eos_id]
    assert tok.encode("the", pad_to=6) == [tok.bos_id, tok.vocab["the</w>"]] + [tok.eos_id] * 4
    n = len(tok.vocab)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (n - 2, n - 1, n)
    with pytest.raises(ValueError, match="pad_to 3"):
        tok.encode(TEXTS[0], pad_to=3)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt, or tokenizer.json"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # half a pair is not enough
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ClipTokenizer.from_dir(tmp_path)


def test_out_of_vocab_symbol_raises(tmp_path):
    vocab, merges = _vocab_and_merges()
    del vocab["z</w>"]
    tok = ClipTokenizer.from_dir(_write_dir(tmp_path, vocab, merges))
    assert tok.encode("zebra")  # a z inside a word is still fine
    with pytest.raises(ValueError, match="'z</w>'.*not in the vocab"):
        tok.encode("buzz")


def test_mismatched_merges_raise():
    vocab, merges = _vocab_and_merges()
    with pytest.raises(ValueError, match="not in the vocab"):
        ClipTokenizer(vocab, [*merges, ("q", "q")])
    del vocab[EOS]
    with pytest.raises(ValueError, match="special token"):
        ClipTokenizer(vocab, merges)
