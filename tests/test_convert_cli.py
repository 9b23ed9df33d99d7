"""`setseq convert`: a fake diffusers release (tiny random reference models saved by diffusers and
transformers themselves) and a fake original-Wan release convert into a checkpoint folder that loads
and matches the references; bad input fails with a clear message and leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from model.config import PRESETS
from model.dit import DiT
from model.t5 import T5Encoder
from setseq.cli import main
from tests.makers import TINY_UMT5, TINY_WAN_DIT, write_wan_release
from weights.checkpoint import load_checkpoint
from weights.convert import model_config
from weights.io import read_state_dict, write_safetensors_atomic

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
UMT5 = dict(vocab_size=100, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, dropout_rate=0.0,
            attn_implementation="eager")


def _randomize(model, scale: float):
    with torch.no_grad():  # zero-initialized tensors (head, tables) would hide a wrong map
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory, sp_model_path):
    """A diffusers-layout folder written by save_pretrained; the transformer is forced into shards."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("diffusers") / "Wan-tiny-Diffusers"
    refs = {
        "dit": _randomize(diffusers.WanTransformer3DModel(**DIT), 0.2),
        "vae": _randomize(diffusers.AutoencoderKLWan(**VAE), 0.1),
        "t5": _randomize(transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)), 0.3),
    }
    refs["dit"].save_pretrained(root / "transformer", max_shard_size="20KB")
    refs["vae"].save_pretrained(root / "vae")
    refs["t5"].save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    shutil.copy(sp_model_path, root / "tokenizer" / "spiece.model")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1  # really sharded
    return root, refs


@pytest.fixture
def src(release, tmp_path):
    """A private copy of the release to damage."""
    return Path(shutil.copytree(release[0], tmp_path / "src"))


def _convert(src, out, *extra) -> int:
    return main(["convert", "--from", extra[0] if extra else "diffusers", str(src), "--out", str(out),
                 "--dtype", "fp32", *extra[1:]])


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@torch.no_grad()
def test_diffusers_release_converts_and_matches_references(release, tmp_path, capsys):
    root, refs = release
    out = tmp_path / "ckpt"
    assert _convert(root, out) == 0
    assert "model: wan2.1-custom" in capsys.readouterr().out
    m = load_checkpoint(out)
    g = torch.Generator().manual_seed(1)
    # text encoder: real positions (ours zeroes padding, as Wan feeds its DiT)
    ids, mask = torch.randint(0, 100, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    want = refs["t5"](input_ids=ids, attention_mask=mask.long()).last_hidden_state
    err = (m.t5(ids, mask)[mask] - want[mask]).abs().max().item()
    assert err <= 1e-5, f"T5 max abs error {err:.2e} > 1e-5"
    # DiT: diffusers takes the timestep in 0..1000; the float64 vs fp32 sinusoid explains ~5e-5
    x, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([0.4])
    err = (m.dit(x, t, ctx) - refs["dit"](x, t * 1000, ctx, return_dict=False)[0]).abs().max().item()
    assert err <= 1e-4, f"DiT max abs error {err:.2e} > 1e-4"
    # VAE: raw posterior mean and the decode of a raw latent
    video = torch.rand(1, 3, 5, 8, 8, generator=g) * 2 - 1
    err = (m.vae.encode_dist(video)[0] - refs["vae"].encode(video).latent_dist.mean).abs().max().item()
    assert err <= 1e-5, f"VAE encode max abs error {err:.2e} > 1e-5"
    z = torch.randn(1, 4, 2, 4, 4, generator=g)
    err = (m.vae.decode_raw(z).clamp(-1, 1) - refs["vae"].decode(z).sample).abs().max().item()
    assert err <= 1e-5, f"VAE decode max abs error {err:.2e} > 1e-5"
    assert m.tokenizer_path.read_bytes() == (root / "tokenizer" / "spiece.model").read_bytes()


def test_dtype_and_parts_are_honoured(release, tmp_path):
    out = tmp_path / "ckpt"
    assert main(["convert", "--from", "diffusers", str(release[0]), "--out", str(out), "--parts", "dit"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dit.safetensors"]
    assert {v.dtype for v in read_state_dict(out / "dit.safetensors").values()} == {torch.bfloat16}
    assert load_checkpoint(out, parts=("dit",)).cfg.t5.dim == 32  # config of unconverted parts still read


def _fails(src, out, capsys, pattern, layout="diffusers", *extra):
    assert _convert(src, out, layout, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert _nothing_written(out)


def test_not_a_checkpoint_folder(tmp_path, capsys):
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "photo.jpg").write_bytes(b"\xff\xd8")
    _fails(tmp_path / "holiday", tmp_path / "out", capsys,
           r"holiday is not a diffusers checkpoint folder: no transformer/")


def test_wrong_layout_flag_is_named(src, tmp_path, capsys):
    _fails(src, tmp_path / "out", capsys, r"not an original Wan 2.1 checkpoint folder.*use --from diffusers",
           "wan")


def test_missing_shard(src, tmp_path, capsys):
    shard = sorted((src / "transformer").glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    _fails(src, tmp_path / "out", capsys, rf"missing shard .*{shard.name}: .* holds '")


def test_truncated_safetensors(src, tmp_path, capsys):
    path = src / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-500])
    _fails(src, tmp_path / "out", capsys, r"vae/diffusion_pytorch_model\.safetensors is truncated or corrupt")


def test_corrupt_header(src, tmp_path, capsys):
    path = src / "text_encoder" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbag"
    path.write_bytes(bytes(data))
    _fails(src, tmp_path / "out", capsys, r"text_encoder/model\.safetensors is truncated or corrupt")


def test_checkpoint_of_another_model(src, tmp_path, capsys):
    write_safetensors_atomic(src / "text_encoder" / "model.safetensors",
                             {"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4),
                              "classifier.weight": torch.zeros(2, 4)})
    _fails(src, tmp_path / "out", capsys,
           r"model\.safetensors is not a umT5 text encoder checkpoint in the diffusers layout: it has no "
           r"'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight'")


def test_config_contradicting_the_tensors_names_both_files(src, tmp_path, capsys):
    config = json.loads((src / "transformer" / "config.json").read_text())
    (src / "transformer" / "config.json").write_text(json.dumps({**config, "ffn_dim": 40}))
    _fails(src, tmp_path / "out", capsys,
           r"transformer/config\.json says ffn_dim = 40, but the weights in \S*transformer/"
           r"diffusion_pytorch_model\.safetensors\.index\.json hold ffn_dim 48")


def test_existing_output_is_not_touched(release, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _convert(release[0], out) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------- original Wan layout


@torch.no_grad()
def test_original_wan_release_converts(tmp_path, sp_model_path, capsys):
    """DiT (sharded safetensors + Wan's config.json) and umT5 (.pth, read with weights_only) in Wan's
    own names, which ours mirror; the VAE config comes from the Wan preset and is not converted."""
    src = tmp_path / "Wan2.1-T2V-tiny"
    torch.manual_seed(0)
    t5 = _randomize(T5Encoder(TINY_UMT5), 0.3)
    dit_cfg = TINY_WAN_DIT
    dit = _randomize(DiT(dit_cfg), 0.2)
    # no text_dim in its config.json, as in real releases: the width 32 is read from text_embedding.0.weight,
    # not assumed 4096
    write_wan_release(src, sp_model_path, dit, t5)

    out = tmp_path / "ckpt"
    assert _convert(src, out, "wan", "--parts", "dit,t5") == 0
    assert "matches no Wan preset" in capsys.readouterr().out
    m = load_checkpoint(out, parts=("dit", "t5"))
    assert m.cfg.dit == dit_cfg and m.cfg.t5.vocab_size == 50 and m.tokenizer_path is not None
    x, ctx = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 3, 32)
    assert torch.equal(m.dit(x, torch.tensor([0.5]), ctx), dit(x, torch.tensor([0.5]), ctx))
    ids = torch.randint(0, 50, (1, 4))
    assert torch.equal(m.t5.token_embedding.weight, t5.token_embedding.weight.to(torch.bfloat16).float())
    assert m.t5(ids).shape == (1, 4, 32)


def test_pth_needing_code_is_refused(tmp_path, capsys):
    src = tmp_path / "wan"
    src.mkdir()
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "hook": _Payload()},
               src / "models_t5_umt5-xxl-enc-bf16.pth")
    _fails(src, tmp_path / "out", capsys,
           r"models_t5_umt5-xxl-enc-bf16\.pth was refused.*weights_only=True.*_Payload",
           "wan", "--parts", "t5")


class _Payload:
    pass


def test_full_size_configs_are_recognised_as_presets():
    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        notes = []
        p = PRESETS[name]
        assert model_config({"dit": p.dit, "vae": p.vae, "t5": p.t5}, notes) == p
        assert notes == [f"the DiT matches preset {name}"]


# --------------------------------------------------------------------- Wan 2.2 TI2V, sizes from tensors

# A tiny Wan 2.2 VAE (residual, 2x2 stem, 48 latent channels) and a 48-channel DiT: a TI2V-5B at test size.
VAE22 = dict(base_dim=8, z_dim=48, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
             is_residual=True, patch_size=2, in_channels=12, out_channels=12, decoder_base_dim=12,
             latents_mean=[0.1] * 48, latents_std=[0.9] * 48)
DIT48 = {**DIT, "in_channels": 48, "out_channels": 48}


@pytest.fixture(scope="module")
def ti2v_release(tmp_path_factory, sp_model_path):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-tiny-Diffusers"
    refs = {"dit": _randomize(diffusers.WanTransformer3DModel(**DIT48), 0.2),
            "vae": _randomize(diffusers.AutoencoderKLWan(**VAE22), 0.1),
            "t5": _randomize(transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)), 0.3)}
    for part, sub in (("dit", "transformer"), ("vae", "vae"), ("t5", "text_encoder")):
        refs[part].save_pretrained(root / sub)
    (root / "tokenizer").mkdir()
    shutil.copy(sp_model_path, root / "tokenizer" / "spiece.model")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                       "expand_timesteps": True}))
    return root, refs


def _write_wan_vae(path: Path, vae) -> None:
    """Our VAE saved as Wan's original .pth (its own key names)."""
    from weights.wan_vae import wan_vae_keymap

    ours_to_wan = {o: w for w, o in wan_vae_keymap(vae.cfg, "wan").items()}
    torch.save({ours_to_wan[k]: v for k, v in vae.state_dict().items()}, path)


def _original_ti2v(src: Path, m) -> None:
    """The original TI2V-5B layout from a converted folder: config.json (no text_dim) + DiT safetensors,
    Wan2.2_VAE.pth, umT5 .pth."""
    src.mkdir()
    write_safetensors_atomic(src / "diffusion_pytorch_model.safetensors", m.dit.state_dict())
    d = m.cfg.dit
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": d.dim, "eps": 1e-6, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim,
        "in_dim": d.in_channels, "model_type": "ti2v", "num_heads": d.heads, "num_layers": d.layers,
        "out_dim": d.out_channels}))
    _write_wan_vae(src / "Wan2.2_VAE.pth", m.vae)
    torch.save(m.t5.state_dict(), src / "models_t5_umt5-xxl-enc-bf16.pth")


@torch.no_grad()
def test_ti2v_release_converts_in_both_layouts(ti2v_release, tmp_path, capsys):
    root, refs = ti2v_release
    out = tmp_path / "ckpt"
    assert _convert(root, out) == 0
    m = load_checkpoint(out)
    assert m.cfg.vae.residual and m.cfg.vae.latent_channels == 48 and m.cfg.vae.space_compression == 8
    assert m.cfg.dit.in_channels == 48 and m.cfg.vae.latents_std == (0.9,) * 48
    z = torch.randn(1, 48, 2, 2, 3)
    want = refs["vae"].decode(z * 0.9 + 0.1).sample
    assert (m.vae.decode(z) - want).abs().max() <= 1e-4
    x, ctx = torch.randn(1, 48, 2, 4, 6), torch.randn(1, 3, 32)
    want = refs["dit"](x, torch.tensor([500.0]), ctx, return_dict=False)[0]
    assert (m.dit(x, torch.tensor([0.5]), ctx) - want).abs().max() <= 1e-4

    _original_ti2v(tmp_path / "orig", m)
    assert _convert(tmp_path / "orig", tmp_path / "ckpt2", "wan", "--parts", "dit,vae") == 0
    again = load_checkpoint(tmp_path / "ckpt2", parts=("dit", "vae"))
    assert again.cfg.dit.text_dim == 32  # from the tensors: Wan's config.json names none
    assert again.cfg.vae.residual and again.cfg.vae.latent_channels == 48
    assert all(torch.equal(v, again.vae.state_dict()[k]) for k, v in m.vae.state_dict().items())


def test_wan21_vae_beside_a_ti2v_dit_is_one_clear_line(ti2v_release, tmp_path, capsys):
    from model.vae import VAE as OurVAE
    from weights.wan_vae import vae_config_from_diffusers

    assert _convert(ti2v_release[0], tmp_path / "ckpt") == 0
    _original_ti2v(tmp_path / "orig", load_checkpoint(tmp_path / "ckpt"))
    (tmp_path / "orig" / "Wan2.2_VAE.pth").unlink()
    _write_wan_vae(tmp_path / "orig" / "Wan2.1_VAE.pth", OurVAE(vae_config_from_diffusers(VAE)))  # 4 channels
    capsys.readouterr()
    _fails(tmp_path / "orig", tmp_path / "out", capsys,
           r"Wan2\.1_VAE\.pth is a Wan 2\.1 VAE with 4 latent channels, but the DiT \(\S+\) takes 48: "
           r"give the Wan 2\.2 VAE \(Wan2\.2_VAE\.pth", "wan", "--parts", "dit,vae")


def test_a_diffusers_vae_config_contradicting_its_tensors_names_both(ti2v_release, tmp_path, capsys):
    src = Path(shutil.copytree(ti2v_release[0], tmp_path / "src"))
    config = json.loads((src / "vae" / "config.json").read_text())
    wan21 = {**config, "is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3,
             "decoder_base_dim": None}  # a Wan 2.1 VAE's config beside Wan 2.2 weights
    (src / "vae" / "config.json").write_text(json.dumps(wan21))
    _fails(src, tmp_path / "out", capsys, r"vae/config\.json does not describe the weights in \S+vae/"
           r"diffusion_pytorch_model\.safetensors: a Wan 2\.1 VAE .* where the weights are a Wan 2\.2 VAE",
           "diffusers", "--parts", "vae")


def test_parts_vae_converts_alone_when_the_dit_has_other_channels(src, tmp_path, capsys):
    """A diffusers folder whose VAE (8 latent channels) does not fit its DiT (4): `--parts vae` converts the
    VAE and never checks the DiT; converting both is one line naming the VAE file."""
    torch.manual_seed(1)
    vae8 = _randomize(diffusers.AutoencoderKLWan(**{**VAE, "z_dim": 8, "latents_mean": None,
                                                     "latents_std": None}), 0.1)
    shutil.rmtree(src / "vae")
    vae8.save_pretrained(src / "vae")
    assert _convert(src, tmp_path / "vae_only", "diffusers", "--parts", "vae") == 0
    assert "the DiT is not converted" in capsys.readouterr().out
    m = load_checkpoint(tmp_path / "vae_only", parts=("vae",))
    assert m.cfg.vae.latent_channels == 8
    _fails(src, tmp_path / "both", capsys,
           r"vae/diffusion_pytorch_model\.safetensors is a Wan 2\.1 VAE with 8 latent channels, but the DiT "
           r"\(\S+\) takes 4", "diffusers", "--parts", "dit,vae")


def test_wan22_vae_in_a_wan21_release_is_one_clear_line(src, ti2v_release, tmp_path, capsys):
    """The reverse: Wan 2.2's VAE (48 channels) in a release whose DiT takes 16 (the full-size Wan 2.1 case
    names Wan2.1_VAE.pth; this tiny DiT takes 4)."""
    shutil.rmtree(src / "vae")
    shutil.copytree(ti2v_release[0] / "vae", src / "vae")
    _fails(src, tmp_path / "out", capsys,
           r"vae/diffusion_pytorch_model\.safetensors is a Wan 2\.2 VAE with 48 latent channels, but the DiT "
           r"\(\S+\) takes 4: give a VAE of 4 channels")


def test_full_size_vae_mixups_name_the_vae_file_the_dit_wants():
    from weights.convert import SourcePart
    from weights.sizes import fit_parts

    wan21, ti2v = PRESETS["wan2.1-14b"], PRESETS["wan2.2-ti2v-5b"]
    for dit, vae, name, want in ((ti2v, wan21, "Wan2.1_VAE.pth", "Wan2.2_VAE.pth"),
                                 (wan21, ti2v, "Wan2.2_VAE.pth", "Wan2.1_VAE.pth")):
        files = {"dit": SourcePart("dit", Path("src/diffusion_pytorch_model.safetensors"), None),
                 "vae": SourcePart("vae", Path(f"src/{name}"), None)}
        with pytest.raises(ValueError) as e:
            fit_parts({"dit": dit.dit, "vae": vae.vae, "t5": dit.t5}, files, [])
        msg = str(e.value)
        assert msg.startswith(f"src/{name} is a Wan") and f"give the Wan {want[3:6]} VAE ({want}" in msg, msg
