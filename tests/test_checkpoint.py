"""weights/checkpoint.py: our checkpoint folder saves, loads strictly, resolves --base, refuses bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.config import PRESETS, DiTConfig, ModelConfig, T5Config, VAEConfig
from model.dit import DiT
from model.t5 import T5Encoder
from model.vae import VAE
from weights.base import COMMITTED, base_config, base_source, load_base
from weights.checkpoint import (
    PART_FILES,
    checkpoint_config,
    describe_checkpoint,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from weights.io import read_state_dict, write_safetensors_atomic

CFG = ModelConfig(
    name="micro",
    dit=DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=2, ffn_dim=64, text_dim=16,
                  rope_split=(8, 4, 4), qk_norm="rms_across_heads"),
    vae=VAEConfig(in_channels=3, latent_channels=4, base_channels=8, channel_mult=(1, 2),
                  encoder_blocks=(1, 1), decoder_blocks=(1, 1), time_strides=(2, 1), space_strides=(2, 1),
                  latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)),
    t5=T5Config(vocab_size=40, dim=16, head_dim=8, heads=2, ffn_dim=24, layers=2, max_length=8),
)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    dit, vae, t5 = DiT(CFG.dit).eval(), VAE(CFG.vae).eval(), T5Encoder(CFG.t5).eval()
    with torch.no_grad():  # zero-initialized parts (head, modulation) would hide a bad load
        for p in [*dit.parameters(), *t5.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return dit, vae, t5


@torch.no_grad()
def _outputs(dit, vae, t5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(0, 40, (1, 5), generator=g), torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    ctx = t5(ids, mask)
    x = torch.randn(1, 4, 1, 4, 4, generator=g)
    video = torch.rand(1, 3, 3, 8, 8, generator=g) * 2 - 1
    return [ctx, dit(x, torch.tensor([0.3]), ctx, mask), vae.encode(video), vae.decode(x[:, :, :, :4, :4])]


@pytest.fixture
def ckpt(tmp_path):
    models = _models()
    folder = save_checkpoint(tmp_path / "ckpt", CFG, *models)
    return folder, models


def test_round_trip_gives_identical_outputs(ckpt):
    folder, models = ckpt
    loaded = load_checkpoint(folder)
    assert loaded.cfg == CFG
    for want, got in zip(_outputs(*models), _outputs(loaded.dit, loaded.vae, loaded.t5), strict=True):
        assert torch.equal(want, got)
    assert torch.equal(loaded.vae.latents_std.flatten(), torch.tensor(CFG.vae.latents_std))  # rebuilt buffer


def test_folder_layout_and_config_json(ckpt):
    folder, _ = ckpt
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", *sorted(PART_FILES.values())]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "setseq-checkpoint" and meta["format_version"] == 1
    assert ModelConfig.from_dict(meta["model"]) == CFG


def test_load_casts_to_the_chosen_dtype(ckpt):
    loaded = load_checkpoint(ckpt[0], dtype="bf16", parts=("dit",))
    assert loaded.dit.head.head.weight.dtype == torch.bfloat16 and loaded.vae is None and loaded.t5 is None


def test_grown_token_embedding_updates_the_saved_config(tmp_path):
    dit, vae, t5 = _models()
    t5.resize_token_embeddings(42)
    folder = save_checkpoint(tmp_path / "c", CFG, dit, vae, t5, added_tokens=["[v]", "[u]"])
    loaded = load_checkpoint(folder, parts=("t5",))
    assert loaded.cfg.t5.vocab_size == 42 and loaded.added_tokens == ["[v]", "[u]"]


def test_tokenizer_file_is_copied(tmp_path, sp_model_path):
    folder = save_checkpoint(tmp_path / "c", CFG, t5=_models()[2], tokenizer_path=sp_model_path)
    loaded = load_checkpoint(folder, parts=("t5",))
    assert loaded.tokenizer_path.read_bytes() == open(sp_model_path, "rb").read()


def test_load_base_loads_a_folder(ckpt, sp_model_path):
    folder, models = ckpt
    t5 = T5Encoder(dataclasses.replace(CFG.t5, vocab_size=128))  # rows for every piece of the tokenizer
    save_checkpoint(folder, CFG, models[0], models[1], t5, tokenizer_path=sp_model_path)
    cfg = base_config(str(folder))
    assert cfg.dit == CFG.dit and cfg.t5.vocab_size == 128
    base = load_base(str(folder), device="cpu")
    assert base.config == cfg and base.dtype == torch.float32
    assert Path(base.tokenizer.path).read_bytes() == Path(sp_model_path).read_bytes()
    assert torch.equal(base.dit.head.head.weight, models[0].head.head.weight)


@pytest.mark.parametrize("name", ["tiny", "tiny-conv"])
def test_a_preset_with_committed_weights_loads_them(name):
    base = load_base(name, device="cpu")
    assert base_source(name) == COMMITTED[name] and base.config == checkpoint_config(COMMITTED[name])
    assert base.config.name == name and base.config.vae.arch == ("linear" if name == "tiny" else "conv")
    on_disk = load_checkpoint(COMMITTED[name], parts=("dit",)).dit.head.head.weight
    assert torch.equal(base.dit.head.head.weight, on_disk)


def test_random_weights_only_when_asked_and_seeded(sp_model_path):
    a, b = (load_base("tiny", device="cpu", tokenizer=sp_model_path, random_weights=True, seed=5)
            for _ in range(2))
    assert a.config == PRESETS["tiny"]
    assert torch.equal(a.t5.token_embedding.weight, b.t5.token_embedding.weight)


def test_a_preset_without_weights_is_refused_before_anything_is_allocated(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("weights were allocated")

    monkeypatch.setattr("weights.base.random_models", no_allocation)
    monkeypatch.setattr("weights.base.load_checkpoint", no_allocation)
    for call in (base_config, load_base):
        with pytest.raises(ValueError, match="without committed weights: convert .*--random-weights"):
            call("wan2.1-1.3b")


def test_load_base_unknown_name():
    with pytest.raises(ValueError, match="not a preset .*tiny"):
        load_base("no-such-model")


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match="not a setseq checkpoint folder.*--from diffusers"):
        load_base(str(tmp_path))
    assert not is_checkpoint(tmp_path)


def test_missing_part_file_is_named(ckpt):
    folder, _ = ckpt
    (folder / "vae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae\.safetensors is missing"):
        load_checkpoint(folder)


def test_part_of_another_model_is_refused_by_key(ckpt):
    folder, _ = ckpt
    write_safetensors_atomic(folder / "dit.safetensors", read_state_dict(folder / "text_encoder.safetensors"))
    with pytest.raises(ValueError, match=r"dit\.safetensors does not match the model.*missing keys: 'blocks"):
        load_checkpoint(folder)


def test_wrong_shape_names_file_key_expected_and_got(ckpt, tmp_path):
    folder, _ = ckpt
    other = dataclasses.replace(CFG.dit, ffn_dim=48)
    write_safetensors_atomic(folder / "dit.safetensors", DiT(other).state_dict())
    pattern = r"dit\.safetensors: .*'blocks\.0\.ffn\.0\.bias': expected \(64,\), got \(48,\)"
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(folder)


def test_truncated_part_file_is_named(ckpt):
    folder, _ = ckpt
    path = folder / "text_encoder.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"text_encoder\.safetensors is truncated or corrupt"):
        load_checkpoint(folder, parts=("t5",))


def test_describe_reads_headers_only(ckpt):
    text = "\n".join(describe_checkpoint(ckpt[0]))
    n = sum(p.numel() for p in ckpt[1][0].parameters())
    assert "model: micro" in text and f"{n / 1e6:.2f}M parameters" in text and "[vae] vae.safetensors" in text
