"""kill -9 at the worst moments (issue 25): a real `python -m setseq personalize` / `convert` process is
SIGKILLed inside a checkpoint write, inside the final concept write and inside a conversion (the
SETSEQ_TEST_KILL hook of model/tempfiles.py puts the kill between a temporary's write and its rename),
then run again: the resumed concept file is byte-identical to an uninterrupted run's, its loss table
has the same rows, and no temporary of the killed processes is left. The slow form also kills at
moments picked by watching the work folder (between writes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.tempfiles import pid_alive, publish, remove_stale, stale_debris, temp_path

ROOT = Path(__file__).resolve().parents[1]
DEBRIS = re.compile(r"^\..+\.(tmp|partial)-\d+")
PERS = ["personalize", "clip.mp4", "--prompt", "a [v] red square on a dark background.", "--motion-prompt",
        "moving [u] right.", "--base", "tiny", "--out", "c.safetensors", "--steps1", "4", "--steps2", "4",
        "--checkpoint-every", "2", "--prior-count", "0", "--batch-size", "1"]


def _run(argv: list[str], cwd: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SETSEQ_TEST_KILL", None)
    if kill:
        env["SETSEQ_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "setseq", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _clip(path: Path) -> None:
    """9 frames of 32x32: a red square moving right on a dark background."""
    import imageio.v2 as iio
    import numpy as np

    frames = [np.full((32, 32, 3), 40, np.uint8) for _ in range(9)]
    for i, f in enumerate(frames):
        f[8:16, 2 + 2 * i:10 + 2 * i] = (200, 50, 50)
    iio.mimwrite(path, frames, fps=8)


def _debris(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if DEBRIS.match(p.name))


def _loss_rows(folder: Path) -> list[list[str]]:
    """loss.tsv without its wall-clock column."""
    rows = [line.split("\t") for line in (folder / "c.work" / "loss.tsv").read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    d = tmp_path_factory.mktemp("whole")
    _clip(d / "clip.mp4")
    run = _run(PERS, d)
    assert run.returncode == 0, run.stderr
    return d


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    _clip(d / "clip.mp4")
    return d


def _same_as(reference: Path, d: Path) -> None:
    assert (d / "c.safetensors").read_bytes() == (reference / "c.safetensors").read_bytes()
    assert _loss_rows(d) == _loss_rows(reference)  # no duplicated or partially averaged rows
    assert _debris(d) == []
    assert (d / "c.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_personalize_killed_in_a_checkpoint_write_then_in_the_final_write(reference, tmp_path):
    d = _folder(tmp_path)
    # The third checkpoint write (stage 2 step 2) dies between its temporary and the rename.
    run = _run(PERS, d, kill="checkpoint:3")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert [Path(p).name.startswith(".stage2-step000002.safetensors.tmp-") for p in _debris(d)] == [True]
    # The resume removes it, says so, and dies inside the final write of the concept file.
    run = _run([*PERS, "--resume"], d, kill="concept")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert re.search(r"note: removed 1 temporary file.*\.stage2-step000002\.safetensors\.tmp-\d+", run.stderr)
    assert not (d / "c.safetensors").exists() and len(_debris(d)) == 1  # never a half concept file
    run = _run([*PERS, "--resume"], d)
    assert run.returncode == 0, run.stderr
    assert re.search(r"note: removed 1 temporary file.*\.c\.safetensors\.tmp-\d+", run.stderr)
    _same_as(reference, d)


def _wan_release(src: Path, sp_model_path: str) -> None:
    """A tiny original-layout Wan release (DiT in two safetensors shards + umT5 .pth + tokenizer)."""
    from model.dit import DiT
    from model.t5 import T5Encoder
    from tests.makers import TINY_UMT5, TINY_WAN_DIT, write_wan_release

    torch.manual_seed(0)
    t5 = T5Encoder(TINY_UMT5)
    write_wan_release(src, sp_model_path, DiT(TINY_WAN_DIT), t5)


def test_convert_killed_mid_conversion_leaves_no_output_and_the_next_run_clears_its_folder(tmp_path,
                                                                                         sp_model_path):
    from weights.checkpoint import load_checkpoint

    _wan_release(tmp_path / "release", sp_model_path)
    argv = ["convert", "--from", "wan", "release", "--out", "ckpt", "--parts", "dit,t5", "--dtype", "fp32"]
    run = _run(argv, tmp_path, kill="convert")  # after the first part is written into the hidden folder
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not (tmp_path / "ckpt").exists()
    [partial] = _debris(tmp_path)
    assert partial.startswith(".ckpt.partial-") and any((tmp_path / partial).iterdir())
    run = _run(argv, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "note: removed 1 temporary file(s) left in '.' by killed process(es)" in run.stderr
    assert partial in run.stderr and _debris(tmp_path) == []
    assert load_checkpoint(tmp_path / "ckpt", parts=("dit", "t5")).cfg.dit.dim == 24
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert modes == {0o666 & ~_umask()}


# ------------------------------------------------------------------------------- the shared helper


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the PID names no process (until the system reuses it)
    return child.pid


def test_only_temporaries_of_dead_processes_are_removed(tmp_path, capsys):
    dead, alive = _dead_pid(), os.getppid()
    out = tmp_path / "v.mp4"
    names = [f".v.mp4.tmp-{dead}.mp4", f".v.mp4.tmp-{alive}.mp4", f".w.mp4.tmp-{dead}.mp4", "v.mp4.tmp-1",
             f".v.mp4.partial-{dead}"]
    for n in names[:4]:
        (tmp_path / n).write_text("x")
    (tmp_path / names[4]).mkdir()
    (tmp_path / names[4] / "part.safetensors").write_text("x")
    assert not pid_alive(dead) and pid_alive(alive)
    assert [p.name for p in stale_debris(tmp_path, out.name)] == sorted([names[0], names[4]])
    remove_stale(tmp_path, out.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:4])  # a live one, another output's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"killed process(es) {dead}:" in err
    remove_stale(tmp_path)  # any output's: the other dead one goes too, the live one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], names[3]])


def test_a_media_write_clears_a_killed_writes_temporary(tmp_path):
    from sample.media import write_gif

    stale = tmp_path / f".g.gif.tmp-{_dead_pid()}.gif"
    stale.write_bytes(b"half a gif")
    write_gif(tmp_path / "g.gif", torch.zeros(3, 2, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gif"]


def test_a_checkpoint_part_write_clears_a_killed_writes_temporary(tmp_path):
    from weights.io import write_safetensors_atomic

    stale = tmp_path / f".dit.safetensors.tmp-{_dead_pid()}"
    stale.write_bytes(b"half a part")
    write_safetensors_atomic(tmp_path / "dit.safetensors", {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.safetensors"]


def test_published_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        tmp = temp_path(tmp_path / "a.bin")
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)  # as the safetensors library and mkstemp make them
        publish(tmp, tmp_path / "a.bin")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------- the long form


def _kill_when(argv: list[str], cwd: Path, ready) -> None:
    """Start `setseq argv`, SIGKILL it as soon as `ready()` holds (or when it ends by itself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SETSEQ_TEST_KILL", None)
    proc = subprocess.Popen([sys.executable, "-m", "setseq", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_personalize_killed_between_writes_at_several_moments(reference, tmp_path):
    """Killed at startup (the latent cache being written), after the first checkpoint, at the stage
    boundary, after the last checkpoint: each resume continues, the end is the uninterrupted file."""
    d = _folder(tmp_path)
    ckpts = d / "c.work" / "checkpoints"
    moments = [lambda: (d / "c.work" / "cache").is_dir(),
               lambda: (ckpts / "stage1-step000002.safetensors").exists(),
               lambda: (ckpts / "stage1-step000004.safetensors").exists(),
               lambda: (ckpts / "stage2-step000004.safetensors").exists()]
    for i, ready in enumerate(moments):
        _kill_when([*PERS, "--resume"] if i else PERS, d, ready)
    run = _run([*PERS, "--resume"], d)
    assert run.returncode == 0, run.stderr
    _same_as(reference, d)
