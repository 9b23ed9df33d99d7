"""Personalization data: frame sets (stage 1), clips (stage 2), stitched pairs, prompts, caches.

Everything expensive is computed once at setup and then only indexed in the loop:

    video (C, T, H, W) ──VAE.encode──► stage 1: every frame alone, (N, C', 1, h, w)   "frame set"
                       ──VAE.encode──► stage 2: clips of `frames` frames, (N, C', T', h, w)
    two concepts ──train/pairs.py──► stitched pairs in the base's two-object layout, a prompt naming both
    prompt texts ──tokenizer──► ids, mask (P, L) ──T5 (no grad)──► context (P, L, D)

A batch is a few indices: which latents, which prompt. `LatentCache` keeps encoded latents on
disk keyed by a hash of what produced them, so a resumed or repeated run encodes nothing again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.tempfiles import publish


@dataclass
class LatentSet:
    """Training items of one stage and one width: latents plus, per item, a prompt and a group.

    The group is the concept an item shows (-1 for a stitched pair); batches draw groups
    uniformly, so a concept with a longer video is not seen more often.
    """

    latents: Tensor  # (N, C, T', H', W')
    prompt: Tensor  # (N,) long: row in the PromptTable
    group: Tensor  # (N,) long

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n item indices (with replacement), uniform over groups, then uniform within a group."""
        counts = torch.bincount(self.group - self.group.min())[self.group - self.group.min()]
        weights = 1.0 / counts.double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def to(self, device: torch.device | str) -> LatentSet:
        return LatentSet(self.latents.to(device), self.prompt.to(device), self.group.to(device))


# ---------------------------------------------------------------------------------------- items


def frame_items(video: Tensor) -> Tensor:
    """(C, T, H, W) -> (T, C, 1, H, W): every frame as its own 1-frame video (an unordered set)."""
    return video.permute(1, 0, 2, 3).unsqueeze(2)


def clip_items(video: Tensor, frames: int) -> Tensor:
    """(C, T, H, W) -> (N, C, frames, H, W): non-overlapping clips from the start.

    A video shorter than one clip is an error here, not a silent pad.
    """
    t = video.shape[1]
    if t < frames:
        raise ValueError(f"video has {t} frames (at the chosen fps), shorter than one clip of {frames}; "
                         "give a longer video, fewer --frames, or a lower --fps")
    n = t // frames
    return torch.stack([video[:, i * frames : (i + 1) * frames] for i in range(n)])


def encode_items(encode: Callable[[Tensor], Tensor], items: Tensor, batch: int = 4) -> Tensor:
    """Encode (N, C, T, H, W) videos in chunks of `batch`; returns (N, C', T', h, w) on the CPU."""
    return torch.cat([encode(items[i : i + batch]).float().cpu() for i in range(0, items.shape[0], batch)])


# ---------------------------------------------------------------------------------------- prompts


@dataclass
class PromptTable:
    """Every distinct prompt of a stage, tokenized, with its T5 encoding computed once.

    Rows whose ids hold a trained token (`trainable`) are re-encoded with gradients each step by
    the loop; `context` holds their no-grad value only for logging and previews.
    """

    texts: list[str]
    ids: Tensor  # (P, L) long
    mask: Tensor  # (P, L) bool
    context: Tensor  # (P, L, D) T5 output, no grad
    trainable: Tensor  # (P,) bool

    def index(self, text: str) -> int:
        return self.texts.index(text)

    def to(self, device: torch.device | str) -> PromptTable:
        return PromptTable(self.texts, self.ids.to(device), self.mask.to(device), self.context.to(device),
                           self.trainable.to(device))


@torch.no_grad()
def build_prompt_table(texts: list[str], tokenizer, t5, max_length: int, trained_ids: list[int]
                       ) -> PromptTable:
    """Tokenize and encode `texts` (deduplicated, order kept); mark rows holding a trained id."""
    texts = list(dict.fromkeys(texts))
    ids, mask = tokenizer.encode(texts, max_length)
    device = next(t5.parameters()).device
    context = t5(ids.to(device), mask.to(device)).float()
    trainable = torch.isin(ids, torch.tensor(trained_ids, dtype=torch.long)).any(dim=1)
    return PromptTable(texts, ids.to(device), mask.to(device), context, trainable.to(device))


def check_prompt(text: str, token: str, what: str, tokenizer, max_length: int) -> None:
    """A concept prompt must name its token, and the token must survive truncation."""
    if token not in text:
        raise ValueError(f"{what} {text!r} does not contain {token}; write it where the concept goes, "
                         f"e.g. 'a {token} dancer on a bridge'")
    token_id = tokenizer.added_tokens[token]
    ids, _ = tokenizer.encode([text], max_length)
    if token_id not in ids[0].tolist():
        raise ValueError(f"{what} {text!r} is longer than the text encoder's {max_length} tokens and {token} "
                         "falls past the cut; shorten it or move the token earlier")


# ------------------------------------------------------------------------------- context regularizers


def mask_tokens(context: Tensor, mask: Tensor, p: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random text-token masking on encoded tokens: each real token is hidden with probability p.

    context (B, L, D), mask (B, L) bool. A hidden token gets mask False and a zero vector. A sample
    whose draw would hide every real token keeps all of them (the DiT needs one real token).
    """
    if p <= 0:
        return context, mask
    hide = (torch.rand(mask.shape, generator=generator, device=mask.device) < p) & mask
    keep = mask & ~hide
    empty = ~keep.any(dim=1, keepdim=True)  # (B, 1)
    keep = torch.where(empty, mask, keep)
    return context * keep[..., None].to(context.dtype), keep


# ---------------------------------------------------------------------------------------- disk cache


class LatentCache:
    """Tensors on disk under a key: `get(name, key, compute)` computes once, then reads the file.

    The key (a JSON-able dict: input files with size and mtime, sizes, base-model identity) is
    hashed into the file name, so a changed input never reads a stale entry.
    """

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder)

    def path(self, name: str, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.folder / f"{name}-{digest}.safetensors"

    def get(self, name: str, key: dict, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.folder is None:
            return compute()
        path = self.path(name, key)
        if path.is_file():
            return load_file(str(path))
        tensors = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"key": json.dumps(key, sort_keys=True, default=str)})
        publish(tmp, path)  # umask permissions (the library writes 0600)
        return tensors


def file_key(path: str | Path) -> dict:
    """What identifies an input file's content cheaply: resolved path, size, modification time."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
