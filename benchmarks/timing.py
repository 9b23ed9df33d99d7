"""The one timing and reporting helper every benchmark uses.

Noisy machines: time candidates side by side in ONE process, interleaved (repeat r runs the
candidates in a rotated order, so drift and a neighbour's load hit all of them alike), drop the
warmup calls, report medians and ratios of medians. Memory: peak RSS from /proc on the CPU (reset
through /proc/self/clear_refs), peak allocated bytes on CUDA.

Each benchmark script builds `Row`s and calls `main_of(run)`: it parses the common flags, runs,
prints a markdown table and, with --json, writes the rows for `benchmarks/run_all.py` to collect.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """ "wall" (default): elapsed time. "cpu": this process's CPU time, which a busy neighbour on a shared
    machine barely disturbs; meaningful for ratios at --threads 1 (with more threads it sums them)."""
    global _clock
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}; choose one of {sorted(CLOCKS)}")
    _clock = CLOCKS[name]


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` samples each, after `warmup` untimed calls each.
    Repeat r runs the fns starting at the r-th (a rotation), so no fn always goes first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            sync(device)
            start = _clock()
            fns[name]()
            sync(device)
            samples[name].append(_clock() - start)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """'median (min-max)' in ms."""
    return f"{1e3 * median(xs):.1f} ms ({1e3 * min(xs):.1f}-{1e3 * max(xs):.1f})"


def ratio(a: list[float], b: list[float]) -> float:
    """median(a) / median(b)."""
    return median(a) / median(b)


def matmul_peak(
    device: torch.device | str, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5
) -> float:
    """Practical peak FLOP/s: a dense n x n x n matmul, median of `repeats` (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = max(1, int(2e9 // (2 * n**3))) if torch.device(device).type == "cpu" else 20
    run = lambda: [a @ b for _ in range(calls)]  # noqa: E731
    t = interleaved({"mm": run}, repeats=repeats, warmup=1, device=device)["mm"]
    return 2 * n**3 * calls / median(t)


# ------------------------------------------------------------------------------------ memory


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def reset_peak(device: torch.device | str) -> bool:
    """Start a new peak-memory window; False if the CPU peak could not be reset (it is then the
    process's lifetime peak, which includes whatever ran before)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_bytes(device: torch.device | str) -> int:
    """Peak since `reset_peak`: max allocated bytes on CUDA, peak resident set (VmHWM) on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return 1024 * _status_kb("VmHWM")


def current_bytes(device: torch.device | str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated()
    return 1024 * _status_kb("VmRSS")


# ------------------------------------------------------------------------------------ reporting


@dataclass
class Row:
    """One measured number. `goal` is text like '<= 0.8'; `ok` is None when there is no goal."""

    bench: str
    metric: str
    value: float
    unit: str = "x"
    goal: str = ""
    ok: bool | None = None
    note: str = ""


def goal_row(
    bench: str,
    metric: str,
    value: float,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    unit: str = "x",
    note: str = "",
) -> Row:
    if at_most is not None:
        return Row(bench, metric, value, unit, f"<= {at_most:g}", value <= at_most, note)
    if at_least is not None:
        return Row(bench, metric, value, unit, f">= {at_least:g}", value >= at_least, note)
    return Row(bench, metric, value, unit, note=note)


def markdown(rows: list[Row]) -> str:
    lines = ["| bench | metric | value | goal | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        value = f"{r.value:.3g} {r.unit}".strip()
        lines.append(f"| {r.bench} | {r.metric} | {value} | {r.goal} | {met} | {r.note} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "clock": args.clock,
        "size": getattr(args, "size", None),
    }
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def add_common(parser: argparse.ArgumentParser, *, sizes: bool = True, compile_flag: bool = True) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first")
    if sizes:
        parser.add_argument("--size", choices=["small", "large", "gpu"], default="small",
                            help="benchmarks/specs.py; gpu = real Wan 2.1 shapes (a GPU's job)")
    if compile_flag:
        parser.add_argument("--compile", action="store_true", help="also time torch.compile'd ours")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine at --threads 1)",
    )
    parser.add_argument("--json", default=None, help="write the rows here as JSON")


def main_of(
    run: Callable[[argparse.Namespace], list[Row]],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> int:
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    if args.clock == "cpu" and torch.device(args.device).type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time, not GPU time; use --clock wall with cuda")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch sees no CUDA device; use --device cpu")
    rows = run(args)
    print(markdown(rows))
    if args.json:
        out = {
            "env": environment(args),
            "argv": sys.argv[1:] if argv is None else argv,
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


__all__ = [
    "use_clock",
    "interleaved",
    "median",
    "spread",
    "ratio",
    "matmul_peak",
    "reset_peak",
    "peak_bytes",
    "current_bytes",
    "Row",
    "goal_row",
    "markdown",
    "add_common",
    "main_of",
    "sync",
]
