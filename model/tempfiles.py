"""Temporary files beside an output, and the debris a killed process leaves of them.

Every writer of ours writes OUT through a temporary beside it, `.OUT.tmp-PID` (a file; a media file keeps
its format's suffix: `.OUT.tmp-PID.mp4`) or `.OUT.partial-PID` (a folder), then renames it onto OUT. A
process killed by SIGKILL (or a power cut) cannot remove its temporary, so the next writer of OUT removes
the ones whose process is gone (`remove_stale`) and says so in one line. A temporary of a live process is
never touched: two runs may write beside each other. A PID the system reused for an unrelated process keeps
its debris until that process ends (the safe side).

Files are published with the permissions the user's umask gives (the safetensors library and mkstemp
create them 0600, readable by their owner only).

`kill_point(name)` is a test hook (tests/test_crash.py): with SETSEQ_TEST_KILL=NAME (or NAME:N, the N-th
time) in the environment the process SIGKILLs itself there, e.g. between a temporary's write and its
rename. Unset, it costs one dictionary lookup.

model/ is the lowest package: lora/, weights/ and sample/ all write outputs and may import only model/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

KINDS = ("tmp", "partial")
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|partial)-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")


def temp_path(path: str | os.PathLike, kind: str = "tmp", keep_suffix: bool = False) -> Path:
    """The hidden temporary of this process beside `path`: `.NAME.KIND-PID` (+ `path`'s suffix if asked:
    imageio picks a format by it)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{path.suffix if keep_suffix else ''}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): kill(0) is all we know
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def stale_debris(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporaries in `folder` (of output `name`, or of any output) whose process is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        m = _DEBRIS.match(p.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not pid_alive(
                int(m["pid"])):
            found.append(p)
    return found


def remove_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the stale temporaries `stale_debris` finds, with one line on stderr naming them."""
    removed = []
    for p in stale_debris(folder, name):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another run removed it first
            continue
        removed.append(p)
    if removed:
        pids = sorted({_DEBRIS.match(p.name)["pid"] for p in removed}, key=int)
        print(f"setseq: note: removed {len(removed)} temporary file(s) left in {str(Path(folder))!r} by "
              f"killed process(es) {', '.join(pids)}: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


def default_mode(folder: bool = False) -> int:
    """The permissions a new file (or folder) gets under the current umask: 0644 (0755) under umask 022."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary the umask's permissions and rename it onto `path` (atomic on one file
    system)."""
    os.chmod(tmp, default_mode(Path(tmp).is_dir()))
    os.replace(tmp, path)


_kills: Counter = Counter()


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process here when SETSEQ_TEST_KILL names this point (NAME or NAME:N)."""
    spec = os.environ.get("SETSEQ_TEST_KILL")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want == name:
        _kills[name] += 1
        if _kills[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
