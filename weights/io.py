"""Reading and writing weight files: safetensors, sharded safetensors, and `.pth` (weights only).

Every reader returns a plain `{name: tensor}` dict on the CPU and raises ValueError naming the file
and what is wrong with it (truncated, corrupt, a missing shard, a pickle holding code); every
writer is atomic (a temporary file beside the target, fsync, then `os.replace`), so a crash never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.safetensors_header import sort_metadata
from model.tempfiles import publish, remove_stale, temp_path

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"


def preview(names, n: int = 6) -> str:
    """`a, b, c, ... (+12 more)`: a readable cap on long key lists in error messages."""
    names = sorted(names)
    head = ", ".join(repr(k) for k in names[:n])
    return head + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint: a .safetensors file, a shard index (`*.safetensors.index.json`, also
    `*.bin.index.json`) with its shards, a pickled .pth/.pt/.bin/.ckpt (opened with weights_only=True),
    or a folder holding exactly one of those."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        return read_state_dict(find_weights_file(path))
    if path.name.endswith(".index.json"):  # model.safetensors.index.json, pytorch_model.bin.index.json
        return read_sharded(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, "
                     f"*{INDEX_SUFFIX} or one of {PICKLE_SUFFIXES}")


def find_weights_file(folder: Path) -> Path:
    """The one weights entry point in `folder`, safetensors first: a shard index, else a single
    .safetensors file, else a pickle shard index, else a single pickle file. Two candidates of the
    same kind is an error (ambiguous)."""
    kinds = (
        sorted(folder.glob(f"*{INDEX_SUFFIX}")),
        sorted(folder.glob("*.safetensors")),
        sorted(p for p in folder.glob("*.index.json") if not p.name.endswith(INDEX_SUFFIX)),
        sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES),
    )
    for found in kinds:
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{folder}: several weight files {[p.name for p in found]}; "
                             "name the one to read")
    raise ValueError(f"{folder} holds no weights: expected a .safetensors file, a *{INDEX_SUFFIX} "
                     f"with its shards, or a .pth/.bin file")


# safetensors' dtype names (get_slice().get_dtype()) -> torch dtypes, for reading a file's layout alone
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
           "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def _torch_dtype(name: str, path: Path) -> torch.dtype:
    """A safetensors dtype name as a torch dtype, or a ValueError naming the file (never a silent float32)."""
    if _DTYPES.get(name) is None:
        raise ValueError(f"{path} holds tensors of dtype {name}, which this reader does not know")
    return _DTYPES[name]


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each read into its own new tensor: one copy in memory. Not through the
    library's memory map: its pages, once read, count in the process's memory beside the copies until the
    file closes (2.1x the weights at the peak, measured), and tensors at the file's (unaligned) offsets take
    other SIMD paths, giving results that differ in the last bits from the same weights in ordinary memory."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # checks the header against the file
            names = list(f.keys())
        with open(path, "rb") as raw:
            start = 8 + int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(start - 8))
            out = {}
            for name in names:
                entry = header[name]
                t = torch.empty(entry["shape"], dtype=_torch_dtype(entry["dtype"], path))
                begin, end = entry["data_offsets"]
                raw.seek(start + begin)
                if raw.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                    raise SafetensorError(f"{name}: the file ends inside its data")
                out[name] = t
            return out
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupt, not a readable safetensors file ({err}); "
                         "download or convert it again") from None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """(name -> (dtype, shape), metadata) without reading any tensor data."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            entries = {}
            for k in f.keys():
                sl = f.get_slice(k)
                entries[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            return entries, metadata
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupt, not a readable safetensors file ({err})") from None


def read_safetensors_meta(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the meta device: names, shapes and dtypes, no tensor data read."""
    entries, _ = read_safetensors_header(path)
    return {k: torch.empty(shape, dtype=_torch_dtype(dt, path), device="meta")
            for k, (dt, shape) in entries.items()}


def read_index(index_path: Path) -> dict[str, str]:
    """weight_map of a sharded checkpoint (key -> shard file name), after checking every shard exists."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a valid shard index (need a json object with a "
                         f"'weight_map'): {err}") from None
    for shard in sorted(set(weight_map.values())):
        if not (index_path.parent / shard).is_file():
            key = next(k for k, v in sorted(weight_map.items()) if v == shard)
            raise ValueError(f"missing shard {index_path.parent / shard}: {index_path.name} says it holds "
                             f"{key!r} (and {sum(v == shard for v in weight_map.values()) - 1} more keys)")
    return weight_map


def read_sharded(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All shards named in the index, checked against it: every key where the index says it is."""
    index_path = Path(index_path)
    weight_map = read_index(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_state_dict(index_path.parent / shard)
        wanted = {k for k, v in weight_map.items() if v == shard}
        if missing := wanted - part.keys():
            raise ValueError(f"shard {index_path.parent / shard} lacks {len(missing)} keys that "
                             f"{index_path.name} puts there: {preview(missing)}")
        if extra := part.keys() - wanted:
            raise ValueError(f"shard {index_path.parent / shard} holds {len(extra)} keys that "
                             f"{index_path.name} does not list: {preview(extra)}")
        state.update(part)
    return state


def read_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pickled state dict, opened with weights_only=True: a file that needs code to unpickle is refused."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        first = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[-1] if lines else "")
        first = first[:300]
        raise ValueError(f"{path} was refused: it holds objects other than tensors and plain containers, "
                         f"and setseq only opens .pth files with weights_only=True ({first}). Re-save "
                         "its state_dict from code you trust, or convert it to safetensors") from None
    except (RuntimeError, EOFError, KeyError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt, not a readable torch checkpoint ({err})") from None
    if isinstance(obj, Mapping) and set(obj) & {"state_dict", "model"} and len(obj) <= 4:
        obj = obj.get("state_dict", obj.get("model"))  # {"state_dict": ...} wrappers of training scripts
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping name -> tensor)")
    if bad := [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]:
        raise ValueError(f"{path} is not a flat state dict: {len(bad)} entries are not tensors: "
                         f"{preview(bad)}")
    return dict(obj)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write) -> None:
    """Run `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)  # a killed earlier write's temporary (model/tempfiles.py)
    tmp = str(temp_path(path))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, path)  # with the umask's permissions: the safetensors library writes 0600
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> None:
    """Save `tensors` (made contiguous, on the CPU, tied storage split) atomically with string metadata."""
    seen: set[int] = set()
    flat = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if ptr in seen and v.numel() else v  # safetensors refuses shared storage
        seen.add(ptr)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=meta)
        sort_metadata(tmp)

    write_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


__all__ = ["read_state_dict", "read_safetensors", "read_safetensors_header", "read_safetensors_meta",
           "read_sharded", "read_pickle", "read_index", "find_weights_file", "write_safetensors_atomic",
           "write_json_atomic", "write_atomic", "preview"]
