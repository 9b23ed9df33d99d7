"""Strict loading: build a module on the meta device, check every key and shape, then assign.

All checks run before any tensor is assigned, on a freshly built module, so a bad checkpoint never
leaves a half-loaded model behind: either every parameter comes from the file or nothing happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from model.fp8 import FP8, fp8_names_in, fp8_structure

from .io import preview

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_meta(module_ctor: Callable[[], nn.Module]) -> nn.Module:
    """The module with every tensor on the meta device: shapes without memory (a 14B model is free)."""
    with torch.device("meta"):
        return module_ctor()


def check_state_dict(expected: Mapping[str, torch.Size | tuple[int, ...]],
                     state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise ValueError unless `state_dict` has exactly the expected keys with exactly their shapes."""
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {preview(unexpected)}")
        raise ValueError(f"{source} does not match the model ({len(expected)} keys expected, "
                         f"{len(state_dict)} found): " + "; ".join(parts))
    wrong = [(k, tuple(expected[k]), tuple(state_dict[k].shape)) for k in sorted(expected)
             if tuple(expected[k]) != tuple(state_dict[k].shape)]
    if wrong:
        lines = ", ".join(f"{k!r}: expected {e}, got {g}" for k, e, g in wrong[:6])
        more = f" (+{len(wrong) - 6} more)" if len(wrong) > 6 else ""
        raise ValueError(f"{source}: {len(wrong)} tensors have the wrong shape: {lines}{more}; "
                         "is the config right for this checkpoint?")


def expected_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Persistent state (parameters and persistent buffers) as `load_state_dict` wants it."""
    return {k: v.shape for k, v in module.state_dict().items()}


def load_into(module_ctor: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor],
              dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
              *, source: str = "state dict") -> nn.Module:
    """Build `module_ctor()` on the meta device, check `state_dict` against it (keys, shapes), then
    assign the tensors (floating ones cast to `dtype`, all moved to `device`). Linears stored in fp8
    (a `weight` of float8_e4m3fn with a `weight_scale` beside it, model/fp8.py) load as FP8Linear and
    keep their fp8 weights and fp32 scales. Non-persistent
    buffers (tables a module computes from its config) are rebuilt on `device` by the module's
    `init_buffers()` (or a CPU build when it has none); float64 tables keep their precision.
    On the meta device (a state dict of meta tensors: a file's layout) it is the same module without
    data, its non-persistent buffers left on the meta device too. Returns the module in eval mode."""
    dtype = parse_dtype(dtype)
    module = build_meta(module_ctor)
    fp8 = fp8_names_in(state_dict)  # a checkpoint written by `setseq convert --dtype fp8`
    fp8_structure(module, fp8)
    if stray := [k for k, v in state_dict.items() if FP8 is not None and v.dtype == FP8
                 and k.removesuffix(".weight") not in fp8]:
        raise ValueError(f"{source}: fp8 tensors without a `weight_scale` beside them: {preview(stray)}; "
                         "the file is damaged, convert it again")
    check_state_dict(expected_shapes(module), state_dict, source=source)
    kept = {f"{n}.weight" for n in fp8} | {f"{n}.weight_scale" for n in fp8}  # fp8 and its fp32 scales
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in kept else v.dtype)
            for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    if torch.device(device).type != "meta":
        materialize_buffers(module, device, module_ctor)
    return module.eval()


def materialize_buffers(module: nn.Module, device: torch.device | str,
                        module_ctor: Callable[[], nn.Module] | None = None) -> None:
    """Recompute the buffers still on the meta device after an assign-load: non-persistent ones, which
    no state dict holds (tables a module derives from its config). An owner's `init_buffers()` rebuilds
    its own; otherwise `module_ctor()` is built once on the CPU and its values copied (slower, exact)."""
    meta = [name for name, b in module.named_buffers() if b.is_meta]
    owners = {name.rpartition(".")[0] for name in meta}
    for owner in sorted(owners):
        sub = module.get_submodule(owner)
        if callable(getattr(sub, "init_buffers", None)):
            with torch.device(device):
                sub.init_buffers()
    if rest := [name for name, b in module.named_buffers() if b.is_meta]:
        if module_ctor is None:
            raise RuntimeError(f"buffers {preview(rest)} are on the meta device and have no init_buffers()")
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            reference = dict(module_ctor().named_buffers())
        for name in rest:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, reference[name].to(device), persistent=False)
    if left := [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"tensors still on the meta device after loading: {preview(left)}")


def random_init(module_ctor: Callable[[], nn.Module], seed: int, dtype: torch.dtype | str = torch.float32,
                device: torch.device | str = "cpu", *, source: str = "random init") -> nn.Module:
    """A freshly initialized module from a fixed seed, built on the CPU (the same seed gives the same
    weights on every machine) and then put through `load_into`, so dtype and buffers follow one path.
    On the meta device: the module without data (nothing drawn)."""
    if torch.device(device).type == "meta":
        return load_into(module_ctor, build_meta(module_ctor).state_dict(), dtype, device, source=source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = module_ctor().state_dict()
    return load_into(module_ctor, state, dtype, device, source=source)


__all__ = ["DTYPES", "parse_dtype", "build_meta", "check_state_dict", "expected_shapes", "load_into",
           "materialize_buffers", "random_init"]
