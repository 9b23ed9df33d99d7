"""Model FLOPs utilization of a DiT training step, against a dense matmul measured in the same run.

MFU = (model FLOPs of the step, model/flops.py: 3x the analytic forward, matrix products only)
      / step time / (FLOP/s of a dense n x n matmul, the machine's practical peak).
Both are timed interleaved in one process. The step is a full-parameter training step (forward,
backward, AdamW) and, separately, forward + backward alone. Goal: >= 60% at --size large.
On CUDA the step runs under bf16 autocast and its peak is a bf16 matmul (the fp32 peak is also shown).

    python -m benchmarks.bench_mfu --size large --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.specs import DIT_SIZES, dit_config, dit_inputs
from benchmarks.timing import Row, add_common, goal_row, interleaved, main_of, median
from model.dit import DiT
from model.flops import dit_train_flops

GOAL = 0.60
SDPA_FIRST = ("cudnn", "flash", "efficient")  # CUDA: which SDPA kernel serves attention best


def sdpa_first(name: str, fn):
    """fn with SDPA trying the named kernel first (falling back in torch's order where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    first = {"cudnn": order[0], "flash": order[1], "efficient": order[2]}[name]
    order = [first] + [b for b in order if b != first]

    def run() -> None:
        with sdpa_kernel(order, set_priority=True):
            fn()

    return run


def matmul_fn(device: torch.device, dtype: torch.dtype, n: int, calls: int):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return run, 2 * n**3 * calls


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = DIT_SIZES[args.size]
    cfg = dit_config(size)
    torch.manual_seed(0)
    dit = DiT(cfg).to(device).train()
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # a zero head would leave the blocks gradient-free
    if args.compile:
        dit.compile_blocks()
    x, t, context = dit_inputs(size, device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            v = dit(x, t, context)
        v.float().square().mean().backward()

    def step() -> None:
        fwd_bwd()
        opt.step()

    n = args.matmul_size or (4096 if cuda else 1024)
    calls = 20 if cuda else max(1, round(4e9 / (2 * n**3)))
    mm, mm_flops = matmul_fn(device, torch.bfloat16 if cuda else torch.float32, n, calls)
    fns = {"step": step, "fwd+bwd": fwd_bwd, "matmul": mm}
    if cuda:
        fns["matmul fp32"], mm32_flops = matmul_fn(device, torch.float32, n, calls)
        for name in SDPA_FIRST:
            fns[f"fwd+bwd {name} first"] = sdpa_first(name, fwd_bwd)
    s = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    peak = mm_flops / median(s["matmul"])
    flops = dit_train_flops(cfg, size.tokens, size.text_len) * size.batch
    shape = f"{size.layers}x{size.dim}, {size.tokens} tokens"
    kind = "bf16" if cuda else "fp32"
    rows = [
        goal_row(
            "mfu",
            f"MFU training step ({shape}{', compiled' if args.compile else ''})",
            flops / median(s["step"]) / peak,
            at_least=GOAL,
            unit="",
            note=f"{flops / 1e9:.2f} GFLOP in {1e3 * median(s['step']):.1f} ms; AdamW included",
        ),
        Row(
            "mfu",
            "MFU forward + backward only",
            flops / median(s["fwd+bwd"]) / peak,
            unit="",
            note=f"{1e3 * median(s['fwd+bwd']):.1f} ms",
        ),
        Row(
            "mfu",
            f"practical peak: dense {kind} matmul {n}^3",
            peak / 1e9,
            unit="GFLOP/s",
            note=f"{torch.get_num_threads()} threads" if not cuda else torch.cuda.get_device_name(),
        ),
    ]
    if cuda:
        for name in SDPA_FIRST:
            took = median(s[f"fwd+bwd {name} first"])
            rows.append(Row("mfu", f"MFU forward + backward, SDPA {name} kernel first", flops / took / peak,
                            unit="", note=f"{1e3 * took:.1f} ms"))
        rows.append(
            Row(
                "mfu",
                f"dense fp32 matmul {n}^3 (TF32 {torch.backends.cuda.matmul.allow_tf32})",
                mm32_flops / median(s["matmul fp32"]) / 1e9,
                unit="GFLOP/s",
            )
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(parser)
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 matmul (1024 CPU, 4096 CUDA)"
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main_of(run, build_parser()))
