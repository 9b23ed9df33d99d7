"""`setseq export` (setseq/cmd_export.py): a concept file -> a standard rank-r LoRA, scales baked in.
The export math and both naming schemes are tested in tests/test_export.py; here the command."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors import safe_open

from lora.concept import base_identity, concept_from_model, load_concept, save_concept
from lora.inject import concept_state_dict, inject_lora
from model.config import PRESETS
from model.dit import DiT
from setseq.cli import main as cli_main

_TINY = PRESETS["tiny"]
DIT = dataclasses.replace(_TINY.dit, dim=32, heads=2, layers=2, ffn_dim=64, rope_split=(8, 4, 4))


def make_concept(path, name: str, seed: int):
    torch.manual_seed(seed)
    dit = DiT(DIT)
    inject_lora(dit, rank=4, name=name)
    with torch.no_grad():
        for key, t in concept_state_dict(dit, name).items():
            if "lora_B" in key:
                t.normal_()
    save_concept(path, concept_from_model(dit, name, base_identity(dit, "tiny"),
                                          tokens={"[v]": torch.zeros(_TINY.t5.dim)}))
    return path


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return make_concept(root / "a.safetensors", "a", 0), make_concept(root / "b.safetensors", "b", 1)


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_export_round_trip_bakes_the_scales_and_has_no_alpha(concepts, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    rc = cli_main(["export", str(concepts[0]), "--format", "comfyui", "--identity", "0.5", "--motion", "2",
                   "--out", str(out)])
    assert rc == 0
    state, meta = read(out)
    assert not [k for k in state if "alpha" in k]
    assert all(re.fullmatch(r"diffusion_model\..+\.lora_[AB]\.weight", k) for k in state)
    concept = load_concept(concepts[0])
    assert len(state) == 2 * len(concept.modules)
    for module in concept.modules:
        a1, b1, b2 = concept.factors(module)
        a, b = (state[f"diffusion_model.{module}.lora_{x}.weight"] for x in "AB")
        torch.testing.assert_close(b @ a, (0.5 * b1 + 2.0 * b2) @ a1, rtol=1e-5, atol=1e-6)
    assert meta["format"] == "setseq-lora-comfyui"
    line = capsys.readouterr().out.strip()
    assert f"{len(state)} keys, {len(concept.modules)} modules, rank 4" in line and str(out) in line


def test_diffusers_format_uses_diffusers_names(concepts, tmp_path):
    out = tmp_path / "lora.safetensors"
    assert cli_main(["export", str(concepts[0]), "--format", "diffusers", "--out", str(out)]) == 0
    state, _ = read(out)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in state
    assert "transformer.blocks.1.ffn.net.2.lora_B.weight" in state


def test_two_concepts_concatenate_along_the_rank(concepts, tmp_path, capsys):
    out = tmp_path / "both.safetensors"
    assert cli_main(["export", *map(str, concepts), "--format", "comfyui", "--out", str(out)]) == 0
    state, _ = read(out)
    assert state["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].shape[0] == 8
    assert "rank 8" in capsys.readouterr().out


def test_existing_file_is_kept_without_force(concepts, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"keep me")
    rc = cli_main(["export", str(concepts[0]), "--format", "comfyui", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and out.read_bytes() == b"keep me"
    assert len(err) == 1 and "exists; pass --force" in err[0]
    assert cli_main(["export", str(concepts[0]), "--format", "comfyui", "--out", str(out), "--force"]) == 0
    assert read(out)[0]


@pytest.mark.parametrize(("name", "message"), [("missing.safetensors", "does not exist"),
                                                ("lora.bin", "must end in .safetensors")])
def test_bad_input_exits_2_with_one_line(concepts, tmp_path, capsys, name, message):
    src, out = (tmp_path / name, tmp_path / "o.safetensors") if name.startswith("missing") else \
        (concepts[0], tmp_path / name)
    rc = cli_main(["export", str(src), "--format", "comfyui", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and err[0].startswith("setseq export: error:")
