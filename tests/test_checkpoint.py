"""weights/checkpoint.py: our checkpoint folder saves, loads strictly, resolves --base, refuses bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from model.config import PRESETS, DiTConfig, ModelConfig, T5Config, VAEConfig
from model.dit import DiT
from model.t5 import T5Encoder
from model.vae import VAE
from weights.checkpoint import (
    PART_FILES,
    describe_checkpoint,
    is_checkpoint,
    load_checkpoint,
    resolve_base,
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


def test_resolve_base_loads_a_folder(ckpt):
    folder, models = ckpt
    cfg, loader = resolve_base(str(folder))
    assert cfg == CFG
    assert torch.equal(loader(parts=("dit",)).dit.head.head.weight, models[0].head.head.weight)


def test_resolve_base_preset_is_seeded_random_with_a_warning():
    cfg, loader = resolve_base("tiny", seed=5)
    assert cfg == PRESETS["tiny"]
    with pytest.warns(UserWarning, match="randomly initialized"):
        a = loader(parts=("t5",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = loader(parts=("t5",))
    assert torch.equal(a.t5.token_embedding.weight, b.t5.token_embedding.weight)


def test_resolve_base_unknown_name():
    with pytest.raises(ValueError, match="not a preset .*tiny"):
        resolve_base("no-such-model")


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match="not a setseq checkpoint folder.*--from diffusers"):
        resolve_base(str(tmp_path))
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
