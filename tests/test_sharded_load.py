"""One host copy of the DiT per machine under torchrun: rank 0 alone reads it, the other ranks build it on
the meta device (`load_base(dit_on_meta=True)`, weights/) and `train.distributed.shard` fills every rank's
FSDP2 shards from rank 0's tensors (fp8 weights and their scales, the adapter, every buffer).

The end-to-end proof, a 2-process run equal to one process within 1e-6, is tests/test_distributed.py's
(it runs this load); here: the meta DiT's layout equals a real load's, and on 2 gloo processes each
rank's shards are bit-equal to its rows of the whole tensors.
"""

from __future__ import annotations

import pytest
import torch

from model import fp8 as F8
from model.config import PRESETS
from model.fp8 import quantize_linears
from tests.makers import as_torchrun_rank, spawn_two_ranks
from weights.base import load_base
from weights.checkpoint import random_models, save_checkpoint

pytestmark = pytest.mark.skipif(F8.FP8 is None, reason="this torch has no float8_e4m3fn")


def _layout(dit: torch.nn.Module) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in dit.state_dict().items()}


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory, sp_model_path):
    """The tiny base with its DiT's block linears stored in fp8 (as `setseq convert --dtype fp8` writes)."""
    folder = tmp_path_factory.mktemp("fp8base")
    models = random_models(PRESETS["tiny"], seed=3)
    quantize_linears(models.dit)
    save_checkpoint(folder, models.cfg, models.dit, models.vae, models.t5, tokenizer_path=sp_model_path)
    return folder


@pytest.mark.parametrize("source", ["folder", "random+fp8", "random"])
def test_the_meta_dit_has_the_layout_a_load_gives_and_reads_no_weight(source, fp8_folder, sp_model_path,
                                                                      monkeypatch):
    base, kw = (str(fp8_folder), {}) if source == "folder" else ("tiny", {"random_weights": True, "seed": 3})
    kw |= {"base_dtype": "fp8"} if source == "random+fp8" else {}
    real = load_base(base, device="cpu", tokenizer=sp_model_path, dit_on_host=True, **kw)
    import weights.checkpoint as wc

    read, reader = [], wc.read_safetensors
    monkeypatch.setattr(wc, "read_safetensors", lambda p: read.append(p.name) or reader(p))
    meta = load_base(base, device="cpu", tokenizer=sp_model_path, dit_on_meta=True, **kw)
    assert _layout(meta.dit) == _layout(real.dit)
    assert all(t.is_meta for t in [*meta.dit.parameters(), *meta.dit.buffers()])
    assert "dit.safetensors" not in read and (source != "folder" or read)  # the VAE's and T5's files only
    if source != "random":
        assert any(v.dtype == F8.FP8 for v in meta.dit.state_dict().values())


def _fill_on_two_ranks(rank: int, port: int, folder: str, sp_model: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lora.inject import concept_adapters, inject_lora
    from train.distributed import World, process_group, shard

    torch.set_num_threads(1)
    as_torchrun_rank(rank, port)
    with process_group("cpu"):
        dit = load_base(folder, device="cpu", tokenizer=sp_model, dit_on_host=rank == 0,
                        dit_on_meta=rank != 0).dit.requires_grad_(False)
        inject_lora(dit, rank=3, name="c")  # rank 3: uneven shards of A1 (3 rows on 2 ranks)
        if rank == 0:
            with torch.no_grad():
                for a in concept_adapters(dit, "c").values():
                    a.lora_B1.normal_()
            torch.save({k: v.clone() for k, v in dit.state_dict().items()}, f"{out}.whole")
        was_meta = all(p.is_meta for p in dit.parameters())
        shard(dit, World(rank, 2, init_device_mesh("cpu", (2,))))
        state = dit.state_dict()
        own = {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}
        sharded = {k for k, v in state.items() if isinstance(v, DTensor)}
        torch.save({"was_meta": was_meta, "own": own, "sharded": sharded}, f"{out}.{rank}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_every_rank_holds_its_rows_of_rank_0s_tensors_bit_for_bit(tmp_path, fp8_folder, sp_model_path):
    out = str(tmp_path / "fill")
    spawn_two_ranks(_fill_on_two_ranks, str(fp8_folder), sp_model_path, out)
    whole = torch.load(f"{out}.whole")
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    assert [g["was_meta"] for g in got] == [False, True]  # rank 1 never read the DiT
    assert got[0]["sharded"] == got[1]["sharded"] and any("lora_A1" in k for k in got[0]["sharded"])
    assert any(whole[k].dtype == F8.FP8 for k in got[0]["sharded"])  # fp8 weights travel as bytes
    assert whole.keys() == got[0]["own"].keys() == got[1]["own"].keys()
    for name, full in whole.items():
        if name in got[0]["sharded"]:  # FSDP2's rows: rank 0 the first ceil(n/2), rank 1 the rest
            parts = [got[r]["own"][name] for r in range(2)]
            assert parts[0].shape[0] == -(-full.shape[0] // 2), name
            assert torch.equal(_bits(torch.cat(parts)), _bits(full)), name
        else:  # buffers (fp8 scales) are whole on every rank
            assert all(torch.equal(_bits(got[r]["own"][name]), _bits(full)) for r in range(2)), name
