r"""CLIP's byte-level BPE tokenizer, written from scratch, for the text side of CLIP-T.

Reads a local Hugging Face CLIP directory: `vocab.json` + `merges.txt`, or else `tokenizer.json`.
Needs only the standard library (no `regex`, ftfy or transformers).

Pipeline, as OpenAI's CLIP `SimpleTokenizer` (and HF `CLIPTokenizer`) does it:
1. clean: html-unescape twice, NFC-normalise, collapse whitespace runs to one space, strip, lowercase;
2. split into pre-tokens with OpenAI's pattern (below);
3. map each pre-token's UTF-8 bytes to printable characters (GPT-2's byte table), mark the word end by
   appending `</w>` to its last symbol, and apply the BPE merges lowest rank first;
4. ids: `<|startoftext|>`, the tokens, `<|endoftext|>`, truncated to `max_length` (77 for CLIP) with the
   end token kept last. CLIP's text model pools the hidden state at the end token, so it must survive.

Pre-tokenisation approximates OpenAI's `regex` pattern with stdlib `re`:
    OpenAI (regex module): <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|
                           [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    here (stdlib re):      the same specials and contractions, then letters `[^\W\d_]+`,
                           one digit `\d` per token, other `(?:[^\w\s]|_)+` (underscore is other).
`\d` is Unicode category Nd only, while `\p{N}` also holds No/Nl (superscripts, fractions, roman
numerals): here those join the letter runs instead of being one token each. ASCII text is exact.

Other known differences (none for plain ASCII text):
- from OpenAI: ftfy's mojibake repair is not done (only its NFC step);
- from HF: `CLIPTokenizer` (the tokenizers backend) does not html-unescape, so "&amp;" differs from HF there;
  this module follows OpenAI, whose tokenizer CLIP was trained with.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
WORD_END = "</w>"

_PRETOKEN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+"
)
_WHITESPACE = re.compile(r"\s+")
_CACHE_LIMIT = 100_000  # distinct words kept; caption vocabularies stay far below this


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, NBSP, soft hyphen) to chr(256 + n), so every token is printable and space-free."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


def clean_text(text: str) -> str:
    """OpenAI's basic_clean + whitespace_clean + lower (without ftfy's mojibake repair)."""
    text = html.unescape(html.unescape(text))  # twice, as OpenAI does: captions are often double-escaped
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:], strict=False))


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every non-overlapping occurrence of `pair`, left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class ClipTokenizer:
    """CLIP BPE over a vocab (token -> id) and ranked merges (first = applied first)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        for special in (BOS, EOS):
            if special not in vocab:
                raise ValueError(f"vocab lacks the special token {special!r}; is this a CLIP vocabulary?")
        for a, b in merges:
            if a + b not in vocab:  # a vocab/merges pair from different models fails here, not mid-run
                raise ValueError(f"merge ({a!r}, {b!r}) makes {a + b!r}, which is not in the vocab; "
                                 f"vocab and merges must come from the same tokenizer")
        self.vocab = dict(vocab)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        # The special strings, if they appear in a prompt, become their own id, as in OpenAI's code.
        self._cache: dict[str, list[int]] = {BOS: [self.bos_id], EOS: [self.eos_id]}

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTokenizer:
        """Load `vocab.json` + `merges.txt` from a HF CLIP directory, or else its `tokenizer.json`."""
        d = Path(path)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
            return cls(vocab, _read_merges_txt(d / "merges.txt"))
        if (d / "tokenizer.json").is_file():
            return cls(*_read_tokenizer_json(d / "tokenizer.json"))
        raise FileNotFoundError(f"no CLIP tokenizer files in {d}: expected vocab.json and merges.txt, or "
                                f"tokenizer.json (as in a Hugging Face CLIP model directory, e.g. "
                                f"openai/clip-vit-large-patch14)")

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]

    @property
    def vocab_size(self) -> int:
        """One past the largest id (embedding rows needed; 49408 for OpenAI CLIP)."""
        return max(self.vocab.values()) + 1

    def tokenize(self, text: str) -> list[int]:
        """Ids of the text alone, without start/end tokens or truncation."""
        ids: list[int] = []
        for word in _PRETOKEN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def encode(self, text: str, max_length: int = 77, *, pad_to: int | None = None) -> list[int]:
        """`[bos, tokens..., eos]`, truncated to `max_length` ids with eos kept last.

        `pad_to` pads with the eos id (HF CLIP's pad token). CLIP's causal text model never lets a
        position see later ones, so padding changes nothing at the first eos, where it pools."""
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for the start and end tokens; use >= 2")
        ids = [self.bos_id, *self.tokenize(text)[: max_length - 2], self.eos_id]
        if pad_to is not None:
            if pad_to < len(ids):
                raise ValueError(f"pad_to {pad_to} is shorter than the {len(ids)} ids; raise pad_to or "
                                 f"lower max_length")
            ids += [self.eos_id] * (pad_to - len(ids))
        return ids

    def _word_ids(self, word: str) -> list[int]:
        if word not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {BOS: [self.bos_id], EOS: [self.eos_id]}
            self._cache[word] = self._lookup(self.bpe(word), word)
        return self._cache[word]

    def bpe(self, word: str) -> tuple[str, ...]:
        """BPE symbols of one pre-token (the last one carries `</w>`)."""
        chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols = (*chars[:-1], chars[-1] + WORD_END)
        while len(symbols) > 1:
            best = min(_pairs(symbols), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            symbols = _merge(symbols, best)
        return symbols

    def _lookup(self, symbols: tuple[str, ...], word: str) -> list[int]:
        missing = [s for s in symbols if s not in self.vocab]
        if missing:
            raise ValueError(f"BPE of {word!r} gave {missing} not in the vocab: the vocab is broken (CLIP's "
                             f"holds all 512 byte symbols, with and without {WORD_END})")
        return [self.vocab[s] for s in symbols]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path} line {n}: expected two symbols 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if "vocab" not in model or "merges" not in model:
        raise ValueError(f"{path} has no model.vocab / model.merges; expected a BPE tokenizer.json")
    vocab = dict(model["vocab"])
    for tok in data.get("added_tokens") or []:  # specials may live only here
        vocab.setdefault(tok["content"], tok["id"])
    merges = []
    for m in model["merges"]:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {m!r} is not a pair; expected 'a b' or ['a', 'b']")
        merges.append((pair[0], pair[1]))
    return vocab, merges
