"""`setseq info`: counts, shapes, tokens and FLOPs of a preset or checkpoint; clear errors on bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import PRESETS
from setseq.cli import main


@pytest.fixture
def networks():
    """The info report builds all three networks (on the meta device); skip until each module exists."""
    for name in ("model.dit", "model.vae", "model.t5"):
        pytest.importorskip(name, reason=f"{name} is not written yet; info needs it for parameter counts")


def _info_json(capsys, *argv) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv) -> str:
    assert main(["info", *argv]) == 2
    return capsys.readouterr().err


def test_paper_preset_json(networks, capsys):
    info = _info_json(capsys, "--preset", "paper")
    assert info["video_tokens"] == 9216
    assert info["latent_shape"] == [32, 16, 36, 64]
    assert abs(info["dit_params"] - 11.5e9) / 11.5e9 < 0.05, info["dit_params"]
    assert info["vae_params"] > 0 and info["text_encoder_params"] > 0
    assert (info["frames"], info["height"], info["width"]) == (121, 576, 1024)


def test_human_readable_output_has_the_numbers(networks, capsys):
    assert main(["info", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    info = _info_json(capsys, "--preset", "paper")
    assert "9,216" in out and "32 x 16 x 36 x 64" in out
    for key in ("dit_params", "vae_params", "text_encoder_params"):
        assert f"{info[key]:,}" in out
    assert f"{info['train_flops_per_step']:.3g}" in out


def test_wan_defaults_give_wan_sequence_length(networks, capsys):
    info = _info_json(capsys, "--preset", "wan2.1-1.3b")
    assert info["latent_shape"] == [16, 21, 60, 104]
    assert info["video_tokens"] == 32760  # Wan 2.1's seq_len for 81 x 480 x 832
    assert abs(info["dit_params"] - 1.42e9) / 1.42e9 < 0.02


def test_frames_and_size_override_defaults(networks, capsys):
    info = _info_json(capsys, "--preset", "tiny", "--frames", "9", "--size", "32x128", "--batch", "4")
    assert info["latent_shape"] == [160, 3, 4, 16]
    assert info["video_tokens"] == 3 * 2 * 8
    one = _info_json(capsys, "--preset", "tiny", "--frames", "9", "--size", "32x128")
    assert info["train_flops_per_step"] == 4 * one["train_flops_per_step"]


@pytest.mark.parametrize("preset,clip", [("paper", (121, 576, 1024)), ("tiny", (9, 32, 128))])
def test_latent_shape_agrees_with_the_vae(networks, preset, clip):
    import torch

    from model.vae import VAE

    cfg = PRESETS[preset]
    with torch.device("meta"):
        vae = VAE(cfg.vae)
    assert cfg.latent_shape(clip[0], clip[1:]) == vae.latent_shape(*clip)


def _checkpoint_folder(folder):
    """A checkpoint folder with its config.json only (no weight files): all `info` reads."""
    from weights.checkpoint import write_config

    write_config(folder, PRESETS["tiny"], parts=(), dtype="fp32")
    return str(folder)


def test_checkpoint_folder_reads_its_config(networks, capsys, tmp_path):
    info = _info_json(capsys, _checkpoint_folder(tmp_path))
    assert info.pop("checkpoint") == str(tmp_path)
    assert info == _info_json(capsys, "--preset", "tiny")


def test_checkpoint_folder_report_describes_the_folder(networks, capsys, tmp_path):
    assert main(["info", _checkpoint_folder(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "video tokens  80 " in out and f"checkpoint {tmp_path}" in out and "[dit] not included" in out


def test_bad_frames_names_value_and_neighbours(capsys):
    err = _error(capsys, "--preset", "paper", "--frames", "120")
    assert "120 frames" in err and "1 + 8k" in err and "113 or 121" in err


def test_bad_size_names_value_and_neighbours(capsys):
    err = _error(capsys, "--preset", "paper", "--size", "577x1024")
    assert "height 577" in err and "multiple of 32" in err and "576 or 608" in err
    err = _error(capsys, "--preset", "wan2.1-1.3b", "--size", "480x830")
    assert "width 830" in err and "816 or 832" in err


def test_malformed_size(capsys):
    assert "576by1024" in _error(capsys, "--preset", "paper", "--size", "576by1024")


def test_unknown_preset(capsys):
    err = _error(capsys, "--preset", "papr")
    assert "'papr'" in err and "paper" in err


def test_missing_checkpoint_config(capsys, tmp_path):
    assert "config.json" in _error(capsys, str(tmp_path))
    assert "does not exist" in _error(capsys, str(tmp_path / "nowhere"))


def test_preset_and_checkpoint_are_exclusive(capsys, tmp_path):
    assert "not both" in _error(capsys, str(tmp_path), "--preset", "tiny")
    assert "--preset" in _error(capsys)


def test_console_script_entry_point(networks):
    exe = shutil.which("setseq") or str(Path(sys.executable).parent / "setseq")
    done = subprocess.run([exe, "info", "--preset", "tiny", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["video_tokens"] == 5 * 4 * 4


def test_ti2v_preset_describes_the_wan22_vae(networks, capsys):
    info = _info_json(capsys, "--preset", "wan2.2-ti2v-5b")
    assert info["latent_shape"] == [48, 31, 44, 80]  # 121 x 704 x 1280 at 4x16x16
    assert info["video_tokens"] == 31 * 22 * 40
    assert abs(info["dit_params"] - 5.0e9) / 5.0e9 < 0.02, info["dit_params"]  # "5B"
    assert main(["info", "--preset", "wan2.2-ti2v-5b"]) == 0
    out = capsys.readouterr().out
    assert "VAE compression 4x16x16" in out and "2x2 space-to-depth stem, residual resampling" in out
    assert "image-to-video" in out


def test_folder_matching_no_preset_needs_a_clip_only_for_per_clip_rows(networks, capsys, tmp_path):
    """A converted custom model names no default clip: its parameter counts need no --frames/--size."""
    import dataclasses

    from weights.checkpoint import write_config

    cfg = dataclasses.replace(PRESETS["wan2.1-1.3b"], name="wan2.1-custom")
    write_config(tmp_path, cfg, parts=(), dtype="fp32")
    assert cfg.default_clip is None
    info = _info_json(capsys, str(tmp_path))
    assert info["dit_params"] == _info_json(capsys, "--preset", "wan2.1-1.3b")["dit_params"]
    assert "latent_shape" not in info
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "need --frames and --size" in out and f"checkpoint {tmp_path}" in out
    assert _info_json(capsys, str(tmp_path), "--frames", "81", "--size", "480x832")["video_tokens"] == 32760
    assert "width 830" in _error(capsys, str(tmp_path), "--frames", "81", "--size", "480x830")
    err = _error(capsys, str(tmp_path), "--frames", "80")
    assert "--frames 80" in err and "1 + 4k" in err  # a given flag is still checked
