"""Run every benchmark, each in its own process (a clean peak-memory window, no state shared), and
write one markdown table and one JSON file of all measured rows.

    python -m benchmarks.run_all --threads 2 --repeats 7 --out runs/bench          # CPU, both sizes
    python -m benchmarks.run_all --sizes small --threads 1 --repeats 3 --clock cpu  # a quick check
    python -m benchmarks.run_all --device cuda --repeats 10 --real-size wan2.1-1.3b --out runs/bench-gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.timing import Row, markdown

BENCHES = ("dit", "vae", "mfu", "personalize")


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each run."""
    common = [
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--clock",
        args.clock,
    ]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    runs = []
    for bench in args.only:
        for size in args.sizes:
            extra = ["--compile"] if args.compile else []
            runs.append((f"bench_{bench}", [*common, "--size", size, *extra]))
    if args.real_size:
        runs.append(("bench_personalize", [*common, "--real-size", args.real_size]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--sizes", nargs="+", choices=["small", "large", "gpu"],
                        default=["small", "large"])
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--real-size", default=None, help="also bench_personalize --real-size PRESET (GPU)")
    parser.add_argument("--out", default="runs/bench", help="folder for results.md and results.json")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, rows, failed = [], [], []
    for script, script_args in plan(args):
        json_path = out / f"{script}-{len(results)}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{script}", *script_args, "--json", str(json_path)]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            failed.append(" ".join(cmd[1:]))
            continue
        print(proc.stdout, flush=True)
        result = json.loads(json_path.read_text())
        result["seconds"] = took
        results.append(result)
        rows += [Row(**r) for r in result["rows"]]
    env = results[0]["env"] if results else {}
    header = (
        f"# setseq benchmarks\n\ndevice {args.device}, threads {env.get('threads')}, clock {args.clock}, "
        f"repeats {args.repeats} (medians; candidates interleaved in one process), torch {env.get('torch')}\n"
    )
    (out / "results.md").write_text(header + "\n" + markdown(rows) + "\n")
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "runs": results, "failed": failed}, indent=1)
    )
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
