"""Peak host memory (RSS) of each process of `torchrun --nproc-per-node N -m setseq personalize` on the CPU.

Not a timing: how many host copies of the DiT a data-parallel run holds. A checkout before the one-copy
load (train/distributed.py `shard`) read the whole DiT in every process; now rank 0 alone reads it and
the others build it on the meta device. The base: the committed tiny base's VAE, T5 and tokenizer with
a wider random DiT (`--dim`, `--layers`), so the DiT dominates a process's memory; one step per stage,
no prior set, no preview. Each torchrun process reports its peak and current RSS when the DiT is loaded
and sharded (VmHWM, VmRSS), and every process its peak over the whole run (getrusage ru_maxrss) at exit.
On the CPU a rank's shards, its gathered blocks and activations are host memory too; on GPUs they are not.

    python -m benchmarks.dist_host_memory                      # this checkout, 2 processes and 1
    python -m benchmarks.dist_host_memory --repo /path/to/other/checkout   # the same run of another
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from train.video import write_video
from weights.checkpoint import load_checkpoint, random_models, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny"

# sitecustomize for each worker: at the end of `train.distributed.shard` (the DiT loaded and sharded) its
# peak and current RSS, and at exit its peak (KiB, Linux) -> lines "shard-peak N", "shard-now N", "run-peak N"
HOOK = """
import atexit, os, resource
if os.environ.get("SETSEQ_RSS_RECORD"):
    path = os.environ["SETSEQ_RSS_RECORD"] + "." + os.environ.get("RANK", "solo")

    def _note(what, kib):
        with open(path, "a") as f:
            f.write(f"{what} {kib}\\n")

    atexit.register(lambda: _note("run-peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    if "RANK" in os.environ:
        import train.distributed as distributed

        real = distributed.shard

        def shard(dit, world):
            real(dit, world)
            status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
            _note("shard-peak", int(status["VmHWM"].split()[0]))
            _note("shard-now", int(status["VmRSS"].split()[0]))

        distributed.shard = shard
"""


def make_base(folder: Path, dim: int, layers: int) -> int:
    """The tiny base with a random DiT `dim` wide (32-wide heads, FFN 4x) and `layers` deep; its bytes."""
    tiny = load_checkpoint(TINY)
    dit_cfg = dataclasses.replace(tiny.cfg.dit, dim=dim, heads=dim // 32, ffn_dim=4 * dim, layers=layers)
    cfg = dataclasses.replace(tiny.cfg, dit=dit_cfg)
    dit = random_models(cfg, seed=0, parts=("dit",)).dit
    save_checkpoint(folder, cfg, dit, tiny.vae, tiny.t5, tokenizer_path=TINY / "tokenizer.model")
    return sum(t.numel() * t.element_size() for t in dit.state_dict().values())


def video() -> torch.Tensor:
    """(3, 13, 32, 32): a bright square moving right on grey."""
    v = torch.full((3, 13, 32, 32), -0.4)
    for i in range(13):
        v[0, i, 8:20, i : i + 12] = 1.0
        v[1:, i, 8:20, i : i + 12] = -1.0
    return v


def run(repo: Path, base: Path, clip: Path, work: Path, nproc: int) -> list[dict[str, float]]:
    """Each process's RSS numbers in MiB (rank order; one entry for a plain process): shard-peak and
    shard-now (torchrun only) and run-peak."""
    (work / "hook").mkdir(parents=True, exist_ok=True)
    (work / "hook" / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": f"{work / 'hook'}{os.pathsep}{repo}", "OMP_NUM_THREADS": "1",
           "SETSEQ_RSS_RECORD": str(work / "rss")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    argv = ["-m", "setseq", "personalize", str(clip), "--prompt", "a [v] square on a grey background.",
            "--motion-prompt", "It is [u] moving right.", "--base", str(base), "--device", "cpu",
            "--steps1", "1", "--steps2", "1", "--batch-size", "2", "--rank", "4", "--prior-count", "0",
            "--preview-every", "0", "--out", str(work / "c.safetensors")]
    cmd = [*launch, *argv] if nproc > 1 else [sys.executable, *argv]
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, text=True)
    names = [f"rss.{r}" for r in range(nproc)] if nproc > 1 else ["rss.solo"]
    return [{k: int(v) / 1024 for k, v in (line.split() for line in (work / n).read_text().splitlines())}
            for n in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose `setseq personalize` runs")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_base(tmp / "base", args.dim, args.layers) / 2**20
        write_video(tmp / "square.mp4", video(), fps=8)
        print(f"DiT {args.dim} wide x {args.layers} blocks: {size:.0f} MiB (fp32); repo {args.repo}")
        for nproc in (args.nproc, 1):
            rss = run(Path(args.repo), tmp / "base", tmp / "square.mp4", tmp / f"run{nproc}", nproc)
            for rank, m in enumerate(rss):
                who = f"rank {rank} of {nproc}" if nproc > 1 else "one process"
                loaded = (f"loaded and sharded: peak {m['shard-peak']:.0f}, then {m['shard-now']:.0f} MiB; "
                          if "shard-peak" in m else "")
                print(f"  {who}: {loaded}whole run: peak {m['run-peak']:.0f} MiB")


if __name__ == "__main__":
    main()
