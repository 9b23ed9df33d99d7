"""Sentencepiece tokenizer for the T5 encoder, with added concept tokens ([v], [u], ...).

Only sentencepiece model files are read (`.model`, e.g. `spiece.model`): T5 and umT5 (Wan 2.1's
text encoder, google/umt5-xxl) both ship their tokenizer as one; a HF `tokenizer.json` is not read.

T5 conventions: pad id 0, EOS `</s>` appended to every prompt, no BOS. Added tokens get ids after the
sentencepiece vocabulary (or from `first_added_id`), and inside a prompt each occurrence becomes
exactly one id; the text between them goes through sentencepiece.

Note for umT5: its embedding table (256384 rows) is larger than its sentencepiece vocabulary, so by
default the added ids land on existing (trained, unused) rows. To give every new token a fresh,
zero-initialized row, build the tokenizer with `first_added_id=<embedding rows>` and call
`T5Encoder.resize_token_embeddings(tokenizer.vocab_size)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

_SP_NAMES = ("spiece.model", "tokenizer.model")


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in _SP_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no sentencepiece model in directory {p}: expected one of {list(_SP_NAMES)}")
    if not p.is_file():
        raise FileNotFoundError(f"sentencepiece model file not found: {p} (expected a .model file such as "
                                f"spiece.model, the tokenizer that T5 / umT5 ship)")
    return p


class Tokenizer:
    """A local sentencepiece model plus a list of added whole-word tokens."""

    def __init__(self, path: str | Path, *, first_added_id: int | None = None):
        self.path = _resolve(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a sentencepiece model (expected a .model file such as "
                             f"spiece.model): {e}") from e
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model {self.path} lacks a pad or eos id (pad={self.pad_id}, "
                             f"eos={self.eos_id}); train it with pad_id=0, eos_id=1 as T5 does")
        sp_size = self.sp.get_piece_size()
        self.first_added_id = sp_size if first_added_id is None else first_added_id
        if self.first_added_id < sp_size:
            raise ValueError(f"first_added_id {first_added_id} would collide with the sentencepiece "
                             f"vocabulary of {sp_size} pieces; pass a value >= {sp_size}")
        self._added: dict[str, int] = {}
        self._pattern: re.Pattern | None = None

    @property
    def sp_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """One past the largest id this tokenizer can emit (embedding rows needed)."""
        return self.first_added_id + len(self._added) if self._added else self.sp_size

    @property
    def added_tokens(self) -> dict[str, int]:
        return dict(self._added)

    def add_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Add whole-word tokens; returns their ids (the existing id for one already added)."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for tok in tokens:
            if not isinstance(tok, str) or not tok or any(c.isspace() for c in tok):
                raise ValueError(f"added token {tok!r} must be a non-empty string without whitespace")
        for tok in tokens:
            if tok not in self._added:
                self._added[tok] = self.first_added_id + len(self._added)
        # Longest first, so "[v2]" is not split as "[v" + ... when "[v]" also exists.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        return [self._added[tok] for tok in tokens]

    def tokenize(self, text: str) -> list[int]:
        """Ids of one text, without EOS: added tokens as single ids, the rest through sentencepiece."""
        parts = self._pattern.split(text) if self._pattern is not None else [text]
        ids: list[int] = []
        for part in parts:
            if part in self._added:
                ids.append(self._added[part])
            elif part.strip():
                ids.extend(self.sp.encode(part.strip()))
        return ids

    def encode(self, texts: str | list[str], max_length: int, *, truncate: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ids (B, max_length) long, mask (B, max_length) bool (True = real token).

        Every text gets `</s>` appended and is right-padded with the pad id. Truncation policy: a text
        longer than max_length - 1 tokens keeps its first max_length - 1 tokens, then `</s>` (the EOS is
        never dropped); with truncate=False it raises ValueError instead.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.bool)
        for i, text in enumerate(texts):
            row = self.tokenize(text)
            if len(row) > max_length - 1:
                if not truncate:
                    raise ValueError(f"text has {len(row)} tokens + </s>, more than max_length {max_length}: "
                                     f"{text[:80]!r}; shorten it or pass truncate=True")
                row = row[: max_length - 1]
            row = row + [self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at the first `</s>`, skips padding, added tokens written as themselves."""
        by_id = {i: t for t, i in self._added.items()}
        words, run = [], []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            if i == self.pad_id:
                continue
            if i in by_id:
                words += [self.sp.decode(run)] if run else []
                words.append(by_id[i])
                run = []
            else:
                run.append(i)
        words += [self.sp.decode(run)] if run else []
        return " ".join(w for w in words if w)

    def added_tokens_json(self) -> str:
        """The added tokens and their ids as a JSON string (for a concept file's metadata)."""
        return json.dumps({"first_added_id": self.first_added_id, "tokens": self._added})

    def load_added_tokens(self, text: str) -> list[int]:
        """Re-add tokens recorded by `added_tokens_json`, checking they get the same ids."""
        record = json.loads(text)
        recorded: dict[str, int] = record["tokens"]
        if record["first_added_id"] != self.first_added_id:
            first = record["first_added_id"]
            raise ValueError(f"recorded tokens start at id {first}, this tokenizer adds from "
                             f"{self.first_added_id}; build it with first_added_id={first}")
        ordered = sorted(recorded, key=recorded.get)
        next_id = self.first_added_id + len(self._added)
        for tok in ordered:  # check every id before changing anything
            have = self._added.get(tok)
            if have is None:
                have, next_id = next_id, next_id + 1
            if have != recorded[tok]:
                raise ValueError(f"added token {tok!r} was recorded with id {recorded[tok]} but would get "
                                 f"{have} here; load the recorded tokens before adding any other tokens")
        return self.add_tokens(ordered)

    def unreadable_words(self, text: str) -> list[str]:
        """Words of `text` the base's tokenizer cannot read: unknown, or spelled out from a bare word start
        ("sprite" -> "▁", "s", "p", ...: a word the base never saw, common with a small vocabulary).
        Concept tokens ([v], [u2], ...) are skipped."""
        out = []
        for word in dict.fromkeys(re.findall(r"\[[^\]\s]+\]|[\w'-]+", text)):
            ids = [] if word.startswith("[") else self.sp.encode(word)
            if self.sp.unk_id() in ids or (ids and self.sp.id_to_piece(ids[0]) == "\u2581"):
                out.append(word)
        return out


def base_tokenizer(sp_path: str | Path, base_tokens: list[str], t5_rows: int) -> Tokenizer:
    """The base's tokenizer: tokens the base already knows keep their ids and new ones follow them;
    without any, new tokens get fresh rows after the T5 table (for umT5, whose table is larger than its
    sentencepiece vocabulary, instead of trained rows that happen to be unused)."""
    if base_tokens:
        tokenizer = Tokenizer(sp_path)
        tokenizer.add_tokens(base_tokens)
        return tokenizer
    return Tokenizer(sp_path, first_added_id=t5_rows)


def train_tokenizer(sentences: Iterable[str], path: str | Path, *, vocab_size: int) -> Path:
    """Train a small unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    For the toy world and tests; writes `path` (a `.model` file) and returns it. `vocab_size` is a soft
    limit: a small corpus may yield fewer pieces.
    """
    path = Path(path)
    if path.suffix != ".model":
        raise ValueError(f"sentencepiece model path must end in .model, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    return path


__all__ = ["Tokenizer", "base_tokenizer", "train_tokenizer"]
