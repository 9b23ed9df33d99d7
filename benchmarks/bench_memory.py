"""Peak memory and step time of a real-size LoRA step with the base held four ways, side by side:

    bf16              the frozen DiT in bf16 (today's path)
    fp8               block linears float8_e4m3fn + 128x128 tile scales (model/fp8.py)
    fp8 + offload K   and the last K blocks in pinned host memory, streamed ahead of use (model/offload.py)

One step = bf16 autocast forward with gradient checkpointing, flow-matching loss, backward into a rank-32
stage-2 LoRA, gradient clipping, AdamW: benchmarks/bench_personalize.py's --real-size step. Presets
wan2.1-1.3b and wan2.1-14b at 81x480x832 (32,760 tokens), text already encoded (T5 not loaded). Peak =
torch.cuda.max_memory_allocated over one step after a warm one; time = median of --repeats steps.
Configurations run one after another (the 14B ones cannot share a GPU), each freed before the next, so
unlike the other benchmarks the candidates are not interleaved. Goals (issue 23): 14B under 24 GiB peak
on one GPU; offload's step time <= 1.3x the same configuration without it (fp8).

    python -m benchmarks.bench_memory --device cuda                      # both presets, K = N/4, N/2, N-1
    python -m benchmarks.bench_memory --device cuda --presets wan2.1-14b --offload 20 39 --repeats 3
    python -m benchmarks.bench_memory --tiny                             # every configuration, small, CPU

`--tiny` runs each configuration on a 4-block Wan-shaped config at 9x64x64 on the CPU in fp32 (peak: the
resident set): it shows the script runs, not what a GPU measures (on the CPU offload saves nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch

from benchmarks.bench_personalize import REAL_VIDEO, frozen_dit, lora_step, peak_of, real_inputs
from benchmarks.timing import Row, add_common, goal_row, interleaved, main_of, median
from lora.inject import DEFAULT_TARGETS, inject_lora, set_stage
from model.config import PRESETS
from model.dit import DiT
from model.fp8 import quantize_linears
from model.offload import BlockOffload

GIB = 2**30
PRESETS_REAL = ("wan2.1-1.3b", "wan2.1-14b")
GOAL_PEAK_GIB = 24.0  # a 24 GB card
GOAL_OFFLOAD = 1.3  # offload's step time over fp8's
TINY = dataclasses.replace(PRESETS["wan2.1-1.3b"].dit, dim=128, heads=2, layers=4, ffn_dim=256, text_dim=64)


TINY_VIDEO = (9, 64, 64)  # pixels of tiny_inputs' 3 x 8 x 8 latent under Wan's 4 x 8 x 8 compression


@dataclasses.dataclass(frozen=True)
class Setup:
    fp8: bool
    offload: int

    def name(self, dtype: torch.dtype) -> str:
        plain = "bf16" if dtype == torch.bfloat16 else "fp32"
        return plain if not self.fp8 else "fp8" if not self.offload else f"fp8 + offload {self.offload}"


def setups(layers: int, offloads: list[int] | None) -> list[Setup]:
    ks = offloads if offloads is not None else sorted({layers // 4, layers // 2, layers - 1} - {0})
    if bad := [k for k in ks if not 0 < k < layers]:
        raise SystemExit(f"--offload {bad}: a base of {layers} blocks offloads 1..{layers - 1}")
    return [Setup(False, 0), Setup(True, 0), *(Setup(True, k) for k in ks)]


def build(cfg, setup: Setup, device: torch.device, dtype: torch.dtype) -> tuple[DiT, BlockOffload | None]:
    """The frozen base held as `setup` says, then a rank-32 stage-2 LoRA on the device (adapters after the
    offload, as weights.base.load_base does, so they are never offloaded)."""
    dit = frozen_dit(cfg, device, dtype, lora=False, checkpointing=True)
    if setup.fp8:
        quantize_linears(dit)  # one layer at a time, on the device
    offload = BlockOffload(dit, dit.blocks, setup.offload, device) if setup.offload else None
    inject_lora(dit, DEFAULT_TARGETS, 32, name="concept")
    set_stage(dit, 2, concepts=["concept"], dropout=0.5)
    return dit.train(), offload


def tiny_inputs(cfg, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    context = torch.randn(1, 32, cfg.text_dim, generator=g)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 12:] = False
    eps, t = torch.randn(x0.shape, generator=g), torch.rand(1, generator=g)
    return x0.to(device), eps.to(device), t.to(device), context.to(device), mask.to(device)


def measure(cfg, setup: Setup, inputs, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Peak bytes, bytes held between steps and the step times of one configuration."""
    dit, offload = build(cfg, setup, device, dtype)
    step = lora_step(dit, inputs, device)
    peak, held, exact = peak_of(step, device, calls=1)
    times = interleaved({"step": step}, repeats=repeats, warmup=0, device=device)["step"]
    return {"peak": peak, "held": held, "exact": exact, "time": median(times),
            "resident": offload.max_resident if offload else 0}


def measure_freed(*args) -> dict:
    """`measure`, then its model, optimizer and caches are gone before the next configuration is built."""
    out = measure(*args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def rows_for(name: str, cfg, results: dict[Setup, dict], dtype: torch.dtype, cuda: bool) -> list[Row]:
    """Each configuration's peak and step time, with its ratios to the plain base's and (offload) to fp8's.
    Goals only on CUDA: the CPU check measures nothing a GPU would."""
    base, fp8 = results[Setup(False, 0)], results[Setup(True, 0)]
    plain = Setup(False, 0).name(dtype)
    rows = []
    for setup, r in results.items():
        note = (f"{r['held'] / GIB:.2f} GiB held between steps; peak/{plain} {r['peak'] / base['peak']:.2f}, "
                f"step/{plain} {r['time'] / base['time']:.2f}")
        if setup.offload:
            note += f"; at most {r['resident']} offloaded blocks resident"
        what = f"{name} {setup.name(dtype)}"
        big = cuda and cfg.layers == PRESETS["wan2.1-14b"].dit.layers and setup.fp8
        rows.append(goal_row("memory", f"peak ({what})", r["peak"] / GIB, unit="GiB", note=note,
                             at_most=GOAL_PEAK_GIB if big else None))
        rows.append(Row("memory", f"step time ({what})", r["time"], unit="s"))
        if setup.offload:
            rows.append(goal_row("memory", f"step time / fp8 ({what})", r["time"] / fp8["time"],
                                 at_most=GOAL_OFFLOAD if cuda else None))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device("cpu" if args.tiny else args.device)
    cuda = device.type == "cuda"
    if not cuda and not args.tiny:
        raise SystemExit("bench_memory measures a GPU: pass --device cuda, or --tiny for the CPU check")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for preset in ["tiny"] if args.tiny else args.presets:
        cfg = TINY if args.tiny else PRESETS[preset].dit
        inputs = tiny_inputs(cfg, device) if args.tiny else real_inputs(preset, 1, device, dtype)
        results = {s: measure_freed(cfg, s, inputs, device, dtype, args.repeats)
                   for s in setups(cfg.layers, args.offload)}
        frames, h, w = TINY_VIDEO if args.tiny else REAL_VIDEO[preset]
        rows += rows_for(f"{preset} {frames}x{h}x{w}", cfg, results, dtype, cuda)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(parser, sizes=False, compile_flag=False)
    parser.add_argument("--presets", nargs="+", choices=PRESETS_REAL, default=list(PRESETS_REAL))
    parser.add_argument("--offload", nargs="+", type=int, default=None, metavar="K",
                        help="blocks to offload, one configuration each (default: N/4, N/2, N-1)")
    parser.add_argument("--tiny", action="store_true",
                        help="each configuration on a small config, on the CPU (checks the script only)")
    parser.set_defaults(repeats=2)
    return parser


if __name__ == "__main__":
    raise SystemExit(main_of(run, build_parser()))
