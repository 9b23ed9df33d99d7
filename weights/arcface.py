"""A local insightface arcface_torch backbone file into `model.arcface.IResNet`, strictly.

Depth and embedding size are read from the keys; nothing is ever downloaded: `load_arcface` reads a file
the user already has.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from model.arcface import IResNet
from weights.io import read_state_dict
from weights.load import build_meta, expected_shapes, load_into

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")  # layerN.K. -> stage N, block K
_FORMAT_HINT = ("the file must be an insightface arcface_torch IResNet backbone "
                "(e.g. backbone.pth of an ms1mv3 or glint360k r50/r100 model)")


def load_arcface(path: str | os.PathLike, device: torch.device | str = "cpu") -> IResNet:
    """The IResNet in a local .pth or .safetensors file, depth and embedding size read from its keys;
    loaded strictly, in eval mode, frozen, float32 (even from a half-precision file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace weights not found at {path}: pass the path of a local insightface "
                                "arcface_torch backbone (.pth or .safetensors); nothing is downloaded")
    state = _strip_module_prefix(read_state_dict(path))
    layers, num_features = _infer_config(state, path)
    build = partial(IResNet, layers, num_features)
    state = _with_bn_counters(state, expected_shapes(build_meta(build)))
    try:
        model = load_into(build, state, device=device, source=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; {_FORMAT_HINT}") from None
    return model.requires_grad_(False)


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DataParallel saves every key as `module.<name>`; strip the prefix only when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _infer_config(state: Mapping[str, Tensor], path: Path) -> tuple[list[int], int]:
    """Blocks per stage from the `layerN.K.` keys; embedding size from fc.weight (D, 512 * 7 * 7)."""
    blocks = [0, 0, 0, 0]
    for key in state:
        if m := _BLOCK_KEY.match(key):
            stage, index = int(m[1]) - 1, int(m[2])
            blocks[stage] = max(blocks[stage], index + 1)
    if 0 in blocks or "fc.weight" not in state:
        raise ValueError(f"{path}: cannot infer the IResNet shape (blocks per stage found: {blocks}; "
                         f"'fc.weight' {'present' if 'fc.weight' in state else 'missing'}); {_FORMAT_HINT}")
    return blocks, state["fc.weight"].shape[0]


def _with_bn_counters(state: dict[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """num_batches_tracked is training bookkeeping that eval never reads: files may lack it."""
    counters = {k for k in expected if k.endswith(".num_batches_tracked")} - state.keys()
    return {**state, **{k: torch.zeros((), dtype=torch.long) for k in counters}}


__all__ = ["load_arcface"]
