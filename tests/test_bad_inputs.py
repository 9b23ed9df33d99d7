"""Bad inputs to every verb (issue 25): each row runs `setseq` in its own process, in a folder that already
holds outputs of earlier runs, and must exit 2 with no traceback and one error line naming the offending
value, leaving every file of the folder as it was (no file changed, none added or removed).

The default run forks each row from this process (torch is imported once: a row costs a fraction of a
second instead of the ~3 s of a fresh interpreter); `-m slow` runs every row as `python -m setseq`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a [v] red square on a dark background."
GEN = ["generate", "--base", "tiny", "--prompt", PROMPT, "--frames", "1", "--steps", "1", "--no-progress"]
PERS_ON = ["personalize", "clip.mp4", "--prompt", PROMPT, "--motion-prompt", "moving [u] right.",
           "--steps1", "1", "--steps2", "1", "--prior-count", "0", "--batch-size", "1", "--base"]
PERS = [*PERS_ON, "tiny"]
EXPORT = ["export", "c.safetensors", "--format", "comfyui"]
_CONCEPT = f'[[concepts]]\nvideo = "clip.mp4"\nprompt = "{PROMPT}"\nmotion_prompt = "moving [u] right."\n'
TOML = {  # name -> text of the TOML files in every row's folder
    "steps2.toml": f'base = "tiny"\nout = "t.safetensors"\nsteps2 = "forty"\n{_CONCEPT}',
    "rank.toml": f'base = "tiny"\nout = "t.safetensors"\nrank = 4.5\n{_CONCEPT}',
    "size.toml": f'base = "tiny"\nout = "t.safetensors"\nsize = "64x64"\n{_CONCEPT}',
    "lr.toml": f'base = "tiny"\nout = "t.safetensors"\nlr = nan\n{_CONCEPT}',
    "lr-negative.toml": f'base = "tiny"\nout = "t.safetensors"\nlr = -1.0\n{_CONCEPT}',
    "fps-negative.toml": f'base = "tiny"\nout = "t.safetensors"\nfps = -8.0\n{_CONCEPT}',
    "tokens.toml": f'base = "tiny"\nout = "t.safetensors"\ntrain_tokens = 1\n{_CONCEPT}',
    "novideo.toml": f'base = "tiny"\nout = "t.safetensors"\n[[concepts]]\nprompt = "{PROMPT}"\n',
    "unknown.toml": f'base = "tiny"\nout = "t.safetensors"\ncolour = "red"\n{_CONCEPT}',
    "broken.toml": 'base = "tiny\n',
}

# (id, argv, what the one error line must name)
ROWS = [
    # the command line itself
    ("unknown-verb", ["paint"], "'paint'"),
    ("int-flag-not-a-number", [*GEN, "--out", "n.mp4", "--seed", "x"], "'x'"),
    # info
    ("info-unknown-preset", ["info", "--preset", "nosuch"], "nosuch"),
    ("info-bad-frames", ["info", "--preset", "tiny", "--frames", "4"], "--frames 4"),
    ("info-bad-size", ["info", "--preset", "tiny", "--size", "64x"], "64x"),
    ("info-not-a-folder", ["info", "notes.txt"], "notes.txt"),
    ("info-batch-0", ["info", "--preset", "tiny", "--batch", "0"], "--batch"),
    # convert
    ("convert-missing-src", ["convert", "--from", "wan", "nosuch", "--out", "o"], "nosuch"),
    ("convert-not-a-release", ["convert", "--from", "wan", "adir", "--out", "o"], "adir"),
    ("convert-pickle-with-code", ["convert", "--from", "wan", "release", "--out", "o", "--parts", "t5"],
     "models_t5_umt5-xxl-enc-bf16.pth"),
    ("convert-out-not-empty", ["convert", "--from", "wan", "release", "--out", "adir", "--parts", "t5"],
     "adir"),
    ("convert-out-a-file", ["convert", "--from", "wan", "release", "--out", "notes.txt", "--parts", "t5"],
     "notes.txt"),
    ("convert-unknown-layout", ["convert", "--from", "nope", "adir", "--out", "o"], "'nope'"),
    # personalize: numbers, paths, TOML types, inputs
    ("personalize-lr-nan", [*PERS, "--out", "p.safetensors", "--lr", "nan"], "'nan'"),
    ("personalize-lr-inf", [*PERS, "--out", "p.safetensors", "--lr", "inf"], "'inf'"),
    ("personalize-fps-0", [*PERS, "--out", "p.safetensors", "--fps", "0"], "'0'"),
    ("personalize-fps-negative", [*PERS, "--out", "p.safetensors", "--fps", "-8"], "'-8'"),
    ("personalize-prior-weight-negative", [*PERS, "--out", "p.safetensors", "--prior-weight", "-1"], "'-1'"),
    ("personalize-out-not-safetensors", [*PERS, "--out", "c.txt"], "c.txt"),
    ("personalize-out-a-folder", [*PERS, "--out", "adir.safetensors"], "adir.safetensors"),
    ("personalize-work-dir-a-file", [*PERS, "--out", "p.safetensors", "--work-dir", "notes.txt"],
     "notes.txt"),
    ("personalize-out-exists", [*PERS, "--out", "c.safetensors"], "c.safetensors"),
    ("personalize-toml-string-for-int", ["personalize", "--config", "steps2.toml"], "'forty'"),
    ("personalize-toml-float-for-int", ["personalize", "--config", "rank.toml"], "4.5"),
    ("personalize-toml-string-for-size", ["personalize", "--config", "size.toml"], "'64x64'"),
    ("personalize-toml-nan", ["personalize", "--config", "lr.toml"], "nan"),
    ("personalize-toml-lr-negative", ["personalize", "--config", "lr-negative.toml"], "lr must be > 0"),
    ("personalize-toml-fps-negative", ["personalize", "--config", "fps-negative.toml"], "fps must be > 0"),
    ("personalize-toml-int-for-bool", ["personalize", "--config", "tokens.toml"], "train_tokens = 1"),
    ("personalize-toml-concept-without-video", ["personalize", "--config", "novideo.toml"], "video"),
    ("personalize-toml-unknown-key", ["personalize", "--config", "unknown.toml"], "colour"),
    ("personalize-toml-invalid", ["personalize", "--config", "broken.toml"], "broken.toml"),
    ("personalize-toml-missing", ["personalize", "--config", "nosuch.toml"], "nosuch.toml"),
    ("personalize-unknown-base", [*PERS_ON, "nosuch", "--out", "p.safetensors"], "nosuch"),
    ("personalize-preset-without-weights", [*PERS_ON, "wan2.1-1.3b", "--out", "p.safetensors"],
     "wan2.1-1.3b"),
    ("personalize-device-tpu", [*PERS, "--out", "p.safetensors", "--device", "tpu"], "'tpu'"),
    ("personalize-device-cuda", [*PERS, "--out", "p.safetensors", "--device", "cuda"], "'cuda'"),
    ("personalize-bf16-on-cpu", [*PERS, "--out", "p.safetensors", "--dtype", "bf16"], "bf16"),
    ("personalize-clip-larger-than-the-base-takes", [*PERS_ON[:1], "big.mp4", *PERS[2:], "--out",
                                                     "p.safetensors"], "at most 128x128 pixels"),
    ("personalize-size-larger-than-the-base-takes", [*PERS, "--out", "p.safetensors", "--size", "256x256"],
     "--size 256x256 is larger"),
    ("personalize-frames-longer-than-the-base-takes", [*PERS, "--out", "p.safetensors", "--frames", "33"],
     "--frames 33 is longer"),
    ("personalize-run-that-cannot-fit-in-memory", [*PERS, "--out", "p.safetensors", "--batch-size",
                                                   "100000000"], "GiB"),
    ("personalize-resume-with-a-changed-setting", [*PERS, "--out", "r.safetensors", "--work-dir", "r.work",
                                                   "--resume", "--rank", "8"], "['rank']"),
    ("personalize-stage-2-without-stage-1", [*PERS, "--out", "p.safetensors", "--stage", "2"], "--stage 1"),
    ("personalize-motion-prompt-without-token", ["personalize", "clip.mp4", "--prompt", "a [v] square",
                                                 "--motion-prompt", "moves up", "--base", "tiny", "--out",
                                                 "p.safetensors"], "--motion-prompt 'moves up'"),
    ("personalize-prompt-without-token", ["personalize", "clip.mp4", "--prompt", "a red square", "--base",
                                          "tiny", "--out", "p.safetensors"], "[v]"),
    # demo and bench: their numbers are checked while parsing or before the base loads
    ("bench-guidance-nan", ["bench", "toyworld", "--quick", "--guidance", "nan"], "'nan'"),
    ("bench-lr-inf", ["bench", "compose", "--quick", "--lr", "inf"], "'inf'"),
    ("bench-rank-zero", ["bench", "compose", "--quick", "--rank", "0"], "rank must be >= 1"),
    ("bench-compose-companions", ["bench", "compose", "--quick", "--companions", "2"], "--companions"),
    ("bench-prior-weight-negative", ["bench", "toyworld", "--quick", "--prior-weight", "-1"], "'-1'"),
    ("demo-samples-0", ["demo", "--quick", "--samples", "0"], "samples"),
    # generate: numbers, outputs, concepts, devices, shapes, scorers
    ("generate-identity-nan", [*GEN, "--out", "n.mp4", "--identity", "nan"], "'nan'"),
    ("generate-motion-inf", [*GEN, "--out", "n.mp4", "--motion", "inf"], "'inf'"),
    ("generate-guidance-nan", [*GEN, "--out", "n.mp4", "--guidance", "nan"], "'nan'"),
    ("generate-guidance-below-one", [*GEN, "--out", "n.mp4", "--guidance", "0.5"], "'0.5'"),
    ("generate-shift-negative", [*GEN, "--out", "n.mp4", "--shift", "-1"], "'-1'"),
    ("generate-fps-0", [*GEN, "--out", "n.mp4", "--fps", "0"], "'0'"),
    ("generate-concept-scale-nan", [*GEN, "--out", "n.mp4", "--concept", "c.safetensors:nan:1"], "'nan'"),
    ("generate-concept-nan-tensor", [*GEN, "--out", "n.mp4", "--concept", "nan.safetensors"],
     "nan.safetensors"),
    ("generate-concept-truncated", [*GEN, "--out", "n.mp4", "--concept", "trunc.safetensors"],
     "trunc.safetensors"),
    ("generate-concept-missing", [*GEN, "--out", "n.mp4", "--concept", "nosuch.safetensors"],
     "nosuch.safetensors"),
    ("generate-region-without-concept", [*GEN, "--out", "n.mp4", "--region", "0,0,0.5,1"],
     "1 --region for 0"),
    ("generate-region-not-a-box", [*GEN, "--out", "n.mp4", "--concept", "c.safetensors", "--region", "0,0,1"],
     "'0,0,1'"),
    ("generate-out-exists", [*GEN, "--out", "g.mp4"], "g.mp4"),
    ("generate-gif-beside-out-exists", [*GEN, "--out", "h.mp4"], "h.gif"),
    ("generate-sheet-beside-out-exists", [*GEN, "--out", "s.mp4", "--contact-sheet"], "s.png"),
    ("generate-metrics-beside-out-exists", [*GEN, "--out", "m.mp4", "--reference", "clip.mp4"],
     "m.metrics.json"),
    ("generate-out-not-mp4", [*GEN, "--out", "g.avi"], "g.avi"),
    ("generate-out-below-a-file", [*GEN, "--out", "notes.txt/n.mp4"], "notes.txt"),
    ("generate-device-cuda", [*GEN, "--out", "n.mp4", "--device", "cuda"], "'cuda'"),
    ("generate-device-tpu", [*GEN, "--out", "n.mp4", "--device", "tpu"], "'tpu'"),
    ("generate-bf16-on-cpu", [*GEN, "--out", "n.mp4", "--dtype", "bf16"], "bf16"),
    ("generate-bad-frames", [*GEN, "--out", "n.mp4", "--frames", "4"], "--frames 4"),
    ("generate-bad-size", [*GEN, "--out", "n.mp4", "--size", "64x"], "64x"),
    ("generate-reference-unreadable", [*GEN, "--out", "n.mp4", "--reference", "notes.txt"], "notes.txt"),
    ("generate-reference-missing", [*GEN, "--out", "n.mp4", "--reference", "nosuch.mp4"], "nosuch.mp4"),
    ("generate-unknown-base", ["generate", "--base", "nosuch", "--prompt", "x", "--out", "n.mp4"], "nosuch"),
    ("generate-arcface-without-reference", [*GEN, "--out", "n.mp4", "--arcface", "code.pth"], "--arcface"),
    ("generate-bad-face-box", [*GEN, "--out", "n.mp4", "--arcface", "code.pth", "--reference", "clip.mp4",
                               "--face-box", "1,2"], "'1,2'"),
    ("generate-unknown-token", [*GEN[:4], "a [z] red square", *GEN[5:], "--out", "n.mp4"], "[z]"),
    # export
    ("export-identity-nan", [*EXPORT, "--out", "x.safetensors", "--identity", "nan"], "'nan'"),
    ("export-motion-inf", [*EXPORT, "--out", "x.safetensors", "--motion", "inf"], "'inf'"),
    ("export-out-exists", [*EXPORT, "--out", "e.safetensors"], "e.safetensors"),
    ("export-out-a-folder", [*EXPORT, "--out", "adir.safetensors", "--force"], "adir.safetensors"),
    ("export-out-not-safetensors", [*EXPORT, "--out", "x.pt"], "x.pt"),
    ("export-nan-concept", ["export", "nan.safetensors", "--format", "comfyui", "--out", "x.safetensors"],
     "nan.safetensors"),
    ("export-truncated-concept", ["export", "trunc.safetensors", "--format", "comfyui", "--out",
                                  "x.safetensors"], "trunc.safetensors"),
    ("export-pickle-as-concept", ["export", "code.pth", "--format", "comfyui", "--out", "x.safetensors"],
     "code.pth"),
    ("export-missing-concept", ["export", "nosuch.safetensors", "--format", "comfyui", "--out",
                                "x.safetensors"], "nosuch.safetensors"),
    # pretrain: refused before any training
    ("pretrain-out-a-file", ["pretrain", "--out", "notes.txt"], "notes.txt"),
    ("pretrain-work-dir-a-file", ["pretrain", "--out", "base", "--work-dir", "notes.txt"], "notes.txt"),
    ("pretrain-lr-nan", ["pretrain", "--out", "base", "--lr", "nan"], "'nan'"),
    ("pretrain-ema-above-1", ["pretrain", "--out", "base", "--ema", "2"], "'2'"),
    ("pretrain-guidance-inf", ["pretrain", "--out", "base", "--guidance", "1", "inf"], "'inf'"),
]


class _Payload:  # a pickled object that is not a tensor: weights_only loading must refuse it
    pass


def _clip(path: Path, side: int = 32) -> None:
    """9 frames of side x side (32: a red square moving right on a dark background)."""
    import imageio.v2 as iio
    import numpy as np

    frames = [np.full((side, side, 3), 40, np.uint8) for _ in range(9)]
    for i, f in enumerate(frames):
        f[8:16, 2 + 2 * i:10 + 2 * i] = (200, 50, 50)
    iio.mimwrite(path, frames, fps=8)


def _cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "setseq", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    """What every row's folder starts with: inputs (a clip, a 1+1-step concept, a NaN one, a truncated one, a
    pickle with code, TOML files) and earlier outputs (videos, an export, a folder named like a file)."""
    from lora.concept import load_concept, save_concept

    d = tmp_path_factory.mktemp("inputs")
    _clip(d / "clip.mp4")
    _clip(d / "big.mp4", 256)  # larger than the tiny base takes (128x128)
    run = _cli([*PERS, "--out", "c.safetensors", "--resume"], d)
    assert run.returncode == 0, run.stderr
    assert "--resume: no checkpoint in" in run.stderr  # --resume with nothing to resume says so
    shutil.move(d / "c.work", d / "r.work")  # its checkpoints: a run to resume
    concept = load_concept(d / "c.safetensors")
    next(iter(concept.lora.values()))[0, 0] = float("nan")
    save_concept(d / "nan.safetensors", concept)
    (d / "trunc.safetensors").write_bytes((d / "c.safetensors").read_bytes()[:200])
    torch.save({"w": torch.zeros(2), "hook": _Payload()}, d / "code.pth")
    (d / "release").mkdir()
    shutil.copy(d / "code.pth", d / "release" / "models_t5_umt5-xxl-enc-bf16.pth")
    for name, text in {**TOML, "notes.txt": "not a video\n"}.items():
        (d / name).write_text(text)
    for name in ("g.mp4", "g.gif", "h.gif", "s.png", "m.metrics.json", "e.safetensors"):
        (d / name).write_bytes(f"an earlier {name}\n".encode())
    (d / "adir").mkdir()
    (d / "adir.safetensors").mkdir()
    (d / "adir" / "keep.txt").write_text("kept\n")
    return d


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder` -> its sha256 ('dir' for a folder)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def warm() -> None:
    """Import what the commands import once, here: a forked row then starts in milliseconds."""
    import importlib

    from setseq.cli import build_parser

    build_parser()
    for name in ("sample.generate", "weights.base", "weights.convert", "train.personalize", "train.video",
                 "lora.export", "toyworld.build_base"):
        importlib.import_module(name)


def _forked(argv: list[str], cwd: Path, err: Path) -> int:
    """Run `setseq argv` in a child process forked from this one; its stderr goes to `err`."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.chdir(cwd)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            from setseq.cli import main

            code = main(argv)
        except SystemExit as e:  # argparse's exit
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()  # what `python -m setseq` would print
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _check(code: int, stderr: str, needle: str, before: dict, after: dict) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1, f"exit {code}, stderr:\n{stderr}"
    assert needle in errors[0], errors[0]
    assert after == before, "files changed, added or removed: " + ", ".join(
        sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))


def _folder(inputs: Path, tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    shutil.copytree(inputs, cwd)
    return cwd


@pytest.mark.parametrize("argv, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_one_line_nothing_touched(argv, needle, inputs, warm, tmp_path):
    cwd = _folder(inputs, tmp_path)
    before = _tree(cwd)
    code = _forked(argv, cwd, tmp_path / "stderr.txt")
    _check(code, (tmp_path / "stderr.txt").read_text(), needle, before, _tree(cwd))


@pytest.mark.slow
@pytest.mark.parametrize("argv, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_as_a_fresh_process(argv, needle, inputs, tmp_path):
    cwd = _folder(inputs, tmp_path)
    before = _tree(cwd)
    run = _cli(argv, cwd)
    _check(run.returncode, run.stderr, needle, before, _tree(cwd))


def test_table_covers_every_verb():
    from setseq.cli import COMMANDS

    covered = {argv[0] for _, argv, _ in ROWS}
    assert len(ROWS) >= 40 and covered >= set(COMMANDS), sorted(covered)
