"""What every command checks the same way, before any weights load: numbers while parsing (argparse types
that refuse nan, inf and values out of range) and output paths (never a folder where a file goes, never a
file where a folder goes, never an existing output without --force). Not a command: shared wiring."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def _number(text: str, ok: Callable[[float], bool], want: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):  # float() reads 'nan' and 'inf': no flag means them
        raise argparse.ArgumentTypeError(f"{text!r}: expected {want}")
    return value


def finite_float(text: str) -> float:
    return _number(text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    return _number(text, lambda v: v >= 0, "a finite number >= 0")


def guidance_scale(text: str) -> float:
    return _number(text, lambda v: v >= 1, "a finite number >= 1 (1 = no classifier-free guidance)")


def probability(text: str) -> float:
    return _number(text, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def _file_above(path: Path) -> Path | None:
    """The nearest existing parent of `path` when it is a file (nothing can be written below it)."""
    parent = next((p for p in path.parents if p.exists()), None)
    return parent if parent is not None and not parent.is_dir() else None


def check_new_files(paths: Iterable[Path], flag: str, force: bool) -> None:
    """Output files: not a folder, not below a file, not an existing file unless `force`."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{flag}: {str(path)!r} is a folder; name a file")
        if (above := _file_above(path)) is not None:
            raise ValueError(f"{flag}: {str(above)!r} is a file, so {str(path)!r} cannot be written")
        if path.exists() and not force:
            raise ValueError(f"{flag}: {str(path)!r} exists; pass --force to overwrite it, or choose another "
                             f"{flag}")


def check_folder(path: Path, flag: str) -> None:
    """A folder a command creates or reuses: not an existing file, not below a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a file; name a folder")
    if (above := _file_above(path)) is not None:
        raise ValueError(f"{flag}: {str(above)!r} is a file, so folder {str(path)!r} cannot be made")


def warn_unreadable(command: str, words: list[str]) -> None:
    """One warning naming the prompt words the base's tokenizer cannot read (Tokenizer.unreadable_words)."""
    if words:
        print(f"setseq {command}: warning: the base's tokenizer cannot read {', '.join(map(repr, words))} "
              "(unknown, or spelled out piece by piece): say it with words of the base's captions",
              file=sys.stderr)



def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def add_memory_flags(p: argparse.ArgumentParser, sampling: bool = False) -> None:
    """--base-dtype and --offload-blocks: how the base DiT is held (personalize and generate); with
    `sampling` (generate) also --offload-idle-expert."""
    p.add_argument("--base-dtype", choices=("fp8",), default=None,
                   help="fp8: the DiT blocks' linear weights as float8_e4m3fn with 128x128 tile scales, "
                        "dequantized in the forward (half their bf16 memory); adapters and optimizer stay "
                        "fp32")
    p.add_argument("--offload-blocks", type=nonnegative_int, default=None, metavar="K",
                   help="keep the last K DiT blocks in pinned host memory and stream each to the GPU just "
                        "before its use, forward and backward (0 = off; at most the block count - 1)")
    if sampling:
        p.add_argument("--offload-idle-expert", action="store_true",
                       help="two-expert bases (Wan 2.2 A14B): keep only the expert in use on the GPU, the "
                            "other in host memory; they swap once per video, at the boundary (one expert's "
                            "memory instead of two, for seconds of copying). Sampling only: personalization "
                            "trains both experts each step. Works with --base-dtype fp8; not with "
                            "--offload-blocks")


def note_offload(command: str, offload_blocks: int | None, device: str | None,
                 idle_expert: bool = False) -> None:
    """Offload on the CPU runs (the schedule the tests check) but saves nothing: host and device are one
    memory. Allowed, so a run configured for a GPU also runs on a laptop; said once, on stderr."""
    cpu = device == "cpu" or (device is None and not _cuda())
    flag = "--offload-blocks" if offload_blocks else "--offload-idle-expert" if idle_expert else None
    if flag and cpu:
        print(f"setseq {command}: note: {flag} on the CPU saves no memory (host and device are the "
              "same memory); it is meant for CUDA", file=sys.stderr)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_first_frame(path: str | None, cfg, size: tuple[int, int]):
    """generate --image: the first frame (3, 1, H, W) in [-1, 1] centre-cropped to `size`, or None; a base
    that cannot take one (an x0 head, a time patch > 1) is refused before any weights load."""
    if path is None:
        return None
    if cfg.dit.prediction != "velocity" or cfg.dit.patch[0] != 1:
        raise ValueError(f"--image: base {cfg.name} cannot take a first frame (it needs a velocity DiT with "
                         f"time patch 1, as Wan's); use a Wan base such as wan2.2-ti2v-5b")
    if not cfg.name.startswith("wan2.2-ti2v"):
        print(f"note: base {cfg.name} was not trained for image-to-video; wan2.2-ti2v-5b was")
    from train.video import read_video

    try:
        return read_video(path, frames=1, size=size)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--image {path!r}: {err}") from None


def parse_box(text: str | None, flag: str = "--face-box") -> tuple[float, float, float, float] | None:
    """'x0,y0,x1,y1' (fractions of the frame) -> the box, or None; a ValueError naming the flag."""
    if text is None:
        return None
    from lora.regions import check_box

    try:
        return check_box(text.split(","))
    except ValueError as err:
        raise ValueError(f"{flag} {text!r}: {err}") from None
