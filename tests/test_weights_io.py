"""weights/io.py and weights/load.py: safe reading, atomic writing, strict meta-device loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from weights.io import (
    preview,
    read_safetensors,
    read_safetensors_header,
    read_safetensors_meta,
    read_state_dict,
    write_atomic,
    write_safetensors_atomic,
)
from weights.load import check_state_dict, load_into, random_init


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g),
            "steps": torch.arange(5)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Evil:  # a class a weights_only unpickler must refuse to build
    pass


class WithTable(nn.Module):
    """A module with a non-persistent buffer computed from its config (like a RoPE table)."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.n = n
        self.proj = nn.Linear(n, n)
        self.init_buffers()

    def init_buffers(self) -> None:
        self.register_buffer("table", torch.arange(self.n, dtype=torch.float64) / 3, persistent=False)


class NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.register_buffer("table", torch.ones(2), persistent=False)


# ------------------------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(path, _tensors(), {"part": "dit", "version": 1})
    assert _equal(read_state_dict(path), _tensors())
    entries, meta = read_safetensors_header(path)
    assert meta == {"part": "dit", "version": "1"}
    assert entries["a.weight"] == ("F32", (8, 4))


def test_write_splits_tied_storage(tmp_path):
    w = torch.randn(3, 3)
    write_safetensors_atomic(tmp_path / "t.safetensors", {"x": w, "y": w})
    got = read_state_dict(tmp_path / "t.safetensors")
    assert torch.equal(got["x"], w) and torch.equal(got["y"], w)


def test_failed_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(path, _tensors(0))

    def crash(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, crash)
    assert _equal(read_state_dict(path), _tensors(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_truncated_safetensors_is_named_and_called_truncated(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors_atomic(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match=r"cut\.safetensors is truncated or corrupt"):
        read_state_dict(path)


def test_safetensors_read_into_own_memory_equals_the_librarys_tensors_and_the_layout_alone(tmp_path):
    """read_safetensors reads each tensor into a new tensor (not the library's memory map): every dtype a
    base holds, 0-dim and empty ones, bit for bit; read_safetensors_meta gives their layout, no data."""
    from safetensors import safe_open


    state = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "i64": torch.arange(4),
             "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
             "empty": torch.zeros(0, 3)}
    if hasattr(torch, "float8_e4m3fn"):
        state["fp8"] = (torch.randn(4, 4) * 10).to(torch.float8_e4m3fn)
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(path, state)
    got = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8) if v.element_size() == 1 else got[k],
                           v.view(torch.uint8) if v.element_size() == 1 else v), k
    meta = read_safetensors_meta(path)
    assert {k: (t.dtype, t.shape, t.is_meta) for k, t in meta.items()} == {
        k: (v.dtype, v.shape, True) for k, v in ref.items()}


def test_a_dtype_the_reader_does_not_know_is_named_not_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "u16.safetensors"
    save_file({"a": torch.zeros(3, dtype=torch.uint16)}, str(path))
    for read in (read_safetensors, read_safetensors_meta):
        with pytest.raises(ValueError, match="dtype U16, which this reader does not know"):
            read(path)


def test_corrupt_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    write_safetensors_atomic(path, _tensors())
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.safetensors is truncated or corrupt"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------ shards


def _sharded(folder: Path) -> Path:
    t = _tensors()
    write_safetensors_atomic(folder / "m-00001-of-00002.safetensors", {"a.weight": t["a.weight"]})
    write_safetensors_atomic(folder / "m-00002-of-00002.safetensors",
                             {"a.bias": t["a.bias"], "steps": t["steps"]})
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "m-00001-of-00002.safetensors", "a.bias": "m-00002-of-00002.safetensors",
        "steps": "m-00002-of-00002.safetensors"}}))
    return index


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    index = _sharded(tmp_path)
    assert _equal(read_state_dict(index), _tensors())
    assert _equal(read_state_dict(tmp_path), _tensors())  # the folder resolves to its index


def test_missing_shard_names_the_file_and_a_key(tmp_path):
    index = _sharded(tmp_path)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing shard .*m-00002-of-00002\.safetensors.*'a\.bias'"):
        read_state_dict(index)


def test_shard_lacking_a_listed_key_is_refused(tmp_path):
    index = _sharded(tmp_path)
    write_safetensors_atomic(tmp_path / "m-00002-of-00002.safetensors", {"a.bias": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"m-00002-of-00002\.safetensors lacks 1 keys .*'steps'"):
        read_state_dict(index)


def test_pickled_shards_load_through_their_index(tmp_path):
    t = _tensors()
    torch.save({"a.weight": t["a.weight"]}, tmp_path / "pytorch_model-1.bin")
    torch.save({"a.bias": t["a.bias"], "steps": t["steps"]}, tmp_path / "pytorch_model-2.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "pytorch_model-1.bin", "a.bias": "pytorch_model-2.bin", "steps": "pytorch_model-2.bin"}}))
    assert _equal(read_state_dict(tmp_path), _tensors())


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no weights"):
        read_state_dict(tmp_path)


# --------------------------------------------------------------------------------------------- pth


def test_pth_state_dict_loads(tmp_path):
    torch.save(_tensors(), tmp_path / "w.pth")
    torch.save({"state_dict": _tensors()}, tmp_path / "wrapped.pt")
    assert _equal(read_state_dict(tmp_path / "w.pth"), _tensors())
    assert _equal(read_state_dict(tmp_path / "wrapped.pt"), _tensors())


def test_pth_with_custom_class_is_refused_by_weights_only(tmp_path):
    torch.save({"a.weight": torch.zeros(2), "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth was refused.*weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")


def test_truncated_pth_is_refused(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(_tensors(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.pth is truncated or corrupt"):
        read_state_dict(path)


# ----------------------------------------------------------------------------------- strict loading


def test_load_into_assigns_casts_and_rebuilds_buffers():
    src = WithTable()
    model = load_into(WithTable, src.state_dict(), dtype="bf16")
    assert model.proj.weight.dtype == torch.bfloat16 and not model.proj.weight.is_meta
    assert torch.equal(model.proj.weight, src.proj.weight.to(torch.bfloat16))
    assert model.table.dtype == torch.float64 and torch.equal(model.table, src.table)  # precision kept


def test_load_into_lists_missing_and_unexpected_keys():
    sd = WithTable().state_dict()
    sd["other.weight"] = sd.pop("proj.bias")
    with pytest.raises(ValueError, match=r"1 missing keys: 'proj\.bias'; 1 unexpected keys: 'other\.weight'"):
        load_into(WithTable, sd, source="w.safetensors")


def test_load_into_names_key_expected_and_got_shape():
    sd = WithTable().state_dict()
    sd["proj.weight"] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"'proj\.weight': expected \(4, 4\), got \(4, 5\)"):
        load_into(WithTable, sd)


def test_load_into_rebuilds_buffers_of_modules_without_init_buffers():
    model = load_into(NoInit, NoInit().state_dict())
    assert not model.table.is_meta and torch.equal(model.table, torch.ones(2))
    assert "table" not in model.state_dict()  # still non-persistent


def test_init_buffers_avoids_a_second_build():
    calls = []

    def ctor():
        calls.append(1)
        return WithTable()

    load_into(ctor, WithTable().state_dict())
    assert len(calls) == 1  # the meta build only


def test_key_lists_in_errors_are_capped():
    expected = {f"k{i:03d}": (1,) for i in range(50)}
    with pytest.raises(ValueError, match=r"50 missing keys: .*\(\+44 more\)") as err:
        check_state_dict(expected, {}, source="x")
    assert len(str(err.value)) < 400
    assert preview(["b", "a"]) == "'a', 'b'"


def test_random_init_is_reproducible_from_its_seed():
    a, b = random_init(WithTable, seed=3), random_init(WithTable, seed=3)
    assert torch.equal(a.proj.weight, b.proj.weight)
    assert not torch.equal(a.proj.weight, random_init(WithTable, seed=4).proj.weight)
