"""Byte-identical safetensors files: the safetensors library writes a file's string metadata in hash
order, which differs from process to process, so equal tensors and metadata gave different bytes (and a
resumed run's concept file differed from an uninterrupted run's). `sort_metadata` rewrites the header in
place with the metadata keys sorted. Every writer of ours (concepts, exports, checkpoints) calls it."""

from __future__ import annotations

import json
import os


def sort_metadata(path: str | os.PathLike) -> None:
    """Sort the `__metadata__` keys of the safetensors file at `path`, in place; the header keeps its length
    (the same keys and values, reordered), so the tensor data does not move."""
    with open(path, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # The library's JSON is compact and escapes only what JSON must; so does this, hence equal lengths.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: the sorted safetensors header is {len(text)} bytes, the written one "
                             f"{size}; cannot sort it in place")
        f.seek(8)
        f.write(text.ljust(size, b" "))  # the library pads its header with spaces too
