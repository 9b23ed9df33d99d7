"""The concept file (lora/concept.py): round trip, base identity, strictness, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora.concept as concept_module
from lora.concept import (
    BaseIdentity,
    Concept,
    apply_concept,
    base_identity,
    concept_from_model,
    load_concept,
    save_concept,
)
from lora.inject import DEFAULT_TARGETS, concept_names, concept_state_dict, inject_lora
from model.config import DiTConfig
from model.dit import DiT

SMALL = DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=2, ffn_dim=64, text_dim=16,
                  qk_norm="rms_per_head", rope_split=(8, 4, 4))


def _dit(cfg: DiTConfig = SMALL, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(cfg)
    with torch.no_grad():  # break the zero inits so outputs depend on every layer
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


def _inputs(cfg: DiTConfig = SMALL):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g), torch.tensor([0.4]),
            torch.randn(1, 3, cfg.text_dim, generator=g))


def _trained_concept(dit: DiT, name: str = "dancer", seed: int = 2) -> Concept:
    inject_lora(dit, DEFAULT_TARGETS, rank=3, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in concept_state_dict(dit, name).values():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return concept_from_model(
        dit, name, base_identity(dit, "small-test"), adapter=name, targets=DEFAULT_TARGETS,
        tokens={"[v]": torch.randn(16, generator=g), "[u]": torch.randn(16, generator=g)},
        prompts={"static": "a [v] sprite on grey", "dynamic": "a [v] sprite on grey, moving in [u] motion"},
        train_config={"stage1_steps": 600, "stage2_steps": 900, "lr": 1e-4},
    )


def test_round_trip_keeps_every_tensor_and_field(tmp_path):
    concept = _trained_concept(_dit())
    path = tmp_path / "dancer.safetensors"
    save_concept(path, concept)
    loaded = load_concept(path)
    assert loaded.name == concept.name and loaded.rank == 3
    assert loaded.targets == DEFAULT_TARGETS and loaded.base == concept.base
    assert loaded.prompts == concept.prompts and loaded.train_config == concept.train_config
    assert list(loaded.tokens) == ["[v]", "[u]"]
    assert all(torch.equal(loaded.tokens[k], v) for k, v in concept.tokens.items())
    assert loaded.lora.keys() == concept.lora.keys()
    assert all(torch.equal(loaded.lora[k], v) for k, v in concept.lora.items())
    assert "blocks.1.cross_attn.o.lora_B2" in loaded.lora


def test_applied_concept_reproduces_the_trained_model(tmp_path):
    trained = _dit()
    concept = _trained_concept(trained)
    x, t, ctx = _inputs()
    want = trained(x, t, ctx)
    save_concept(tmp_path / "c.safetensors", concept)
    fresh = _dit()
    base_out = fresh(x, t, ctx)
    loaded = load_concept(tmp_path / "c.safetensors")
    apply_concept(fresh, loaded, expected_base=base_identity(fresh, "small-test"))
    got = fresh(x, t, ctx)
    assert torch.equal(got, want)
    assert not torch.allclose(got, base_out, atol=1e-4)


def test_concept_for_another_architecture_is_refused_naming_both():
    concept = _trained_concept(_dit())
    other_cfg = DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=3, ffn_dim=64, text_dim=16,
                          qk_norm="rms_per_head", rope_split=(8, 4, 4))
    other = _dit(other_cfg)
    with pytest.raises(ValueError, match=r"small-test \(fingerprint .*but this model is"):
        apply_concept(other, concept)
    assert concept_names(other) == []


def test_concept_for_another_named_base_is_refused_naming_both():
    dit = _dit()
    concept = _trained_concept(dit)
    fresh = _dit()
    with pytest.raises(ValueError, match=r"trained on base model small-test .* this model is other-base"):
        apply_concept(fresh, concept, expected_base=base_identity(fresh, "other-base"))


def test_expected_base_must_describe_the_model():
    concept = _trained_concept(_dit())
    with pytest.raises(ValueError, match="does not describe this model"):
        apply_concept(_dit(), concept, expected_base=BaseIdentity("small-test", "0123456789abcdef"))


def test_fingerprint_ignores_weights_dtype_and_lora():
    a, b = _dit(seed=0), _dit(seed=1).to(torch.float64)
    fa = base_identity(a, "x").fingerprint
    inject_lora(a, rank=2)
    assert base_identity(a, "x").fingerprint == fa == base_identity(b, "x").fingerprint


def test_two_concepts_apply_side_by_side(tmp_path):
    one = _trained_concept(_dit(), "dancer", seed=2)
    two = _trained_concept(_dit(), "waves", seed=3)
    model = _dit()
    apply_concept(model, one)
    apply_concept(model, two, motion=0.5)
    assert concept_names(model) == ["dancer", "waves"]
    q = model.blocks[0].self_attn.q
    assert torch.equal(q.adapters["dancer"].lora_B1, one.lora["blocks.0.self_attn.q.lora_B1"])
    assert torch.equal(q.adapters["waves"].lora_B2, two.lora["blocks.0.self_attn.q.lora_B2"])
    assert q.adapters["waves"].beta == 0.5 and q.adapters["dancer"].beta == 1.0


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_concept(tmp_path / "nope.safetensors")


def test_corrupt_file_raises_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    save_concept(path, _trained_concept(_dit()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_concept(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a setseq concept file"):
        load_concept(path)


def test_incomplete_layer_is_refused(tmp_path):
    concept = _trained_concept(_dit())
    lora = dict(concept.lora)
    del lora["blocks.0.ffn.2.lora_B2"]
    with pytest.raises(ValueError, match=r"blocks.0.ffn.2 lacks \['lora_B2'\]"):
        Concept(name="x", lora=lora, targets=(), base=concept.base)


def test_metadata_is_plain_json(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "c.safetensors"
    save_concept(path, _trained_concept(_dit()))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "setseq-concept" and meta["rank"] == "3"
    assert json.loads(meta["base"])["name"] == "small-test"
    assert json.loads(meta["prompts"])["static"] == "a [v] sprite on grey"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    first = _trained_concept(_dit(), seed=2)
    save_concept(path, first)
    old = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(concept_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_concept(path, _trained_concept(_dit(), seed=3))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


# ------------------------------------------------------------------------------------ weights identity


def test_weights_hash_tells_two_trainings_apart_but_not_dtypes_or_adapters():
    a, b = _dit(seed=0), _dit(seed=1)
    h = base_identity(a, "x").weights
    assert len(h) == 16 and h != base_identity(b, "x").weights
    assert base_identity(_dit(seed=0).to(torch.bfloat16), "x").weights == h  # fp32 vs bf16 load
    inject_lora(a, rank=2)
    assert base_identity(a, "x").weights == h


def test_weights_hash_of_an_fp8_load_equals_its_full_precision_load():
    from model.fp8 import quantize_linears

    h = base_identity(_dit(seed=0), "x").weights
    fp8 = _dit(seed=0)
    assert quantize_linears(fp8)  # the block linears are float8 now, with scales beside them
    assert base_identity(fp8, "x").weights == h
    other = _dit(seed=1)
    quantize_linears(other)
    assert base_identity(other, "x").weights != h  # other weights still tell apart


def test_a_concept_on_other_weights_of_its_base_warns_once_and_applies(tmp_path, capsys):
    save_concept(tmp_path / "c.safetensors", _trained_concept(_dit(seed=0)))
    concept = load_concept(tmp_path / "c.safetensors")
    other = _dit(seed=1)
    apply_concept(other, concept, expected_base=base_identity(other, "small-test"))
    assert concept_names(other) == ["dancer"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: concept 'dancer' was trained on other small-test weights" in err
    assert concept.base.weights in err and base_identity(other, "small-test").weights in err
    same = _dit(seed=0)
    apply_concept(same, concept, expected_base=base_identity(same, "small-test"))
    assert capsys.readouterr().err == ""


def test_a_concept_file_without_the_weights_hash_still_loads_and_applies(tmp_path, capsys):
    old = _trained_concept(_dit(seed=0))
    old.base = BaseIdentity(old.base.name, old.base.fingerprint)  # as files were written before the hash
    save_concept(tmp_path / "old.safetensors", old)
    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["base"]) == {"name": "small-test", "fingerprint": old.base.fingerprint}
    concept = load_concept(tmp_path / "old.safetensors")
    other = _dit(seed=1)
    apply_concept(other, concept, expected_base=base_identity(other, "small-test"))
    assert concept.base.weights == "" and concept_names(other) == ["dancer"]
    assert capsys.readouterr().err == ""


def test_the_random_tiny_preset_and_the_committed_tiny_base_differ_only_by_weights(sp_model_path):
    from weights.base import load_base

    bases = (load_base("tiny", random_weights=r, tokenizer=sp_model_path) for r in (False, True))
    committed, random = (base_identity(b.dit, b.name) for b in bases)
    assert (committed.name, committed.fingerprint) == (random.name, random.fingerprint)
    assert committed.weights != random.weights
