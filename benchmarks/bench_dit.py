"""Our DiT vs diffusers' WanTransformer3DModel: same config, same (converted) weights, same inputs.

Times forward + backward (all parameters trainable, loss = mean square of the output) and forward
alone, interleaved in one process; the ratio ours / reference is the number to watch (goal <= 0.8
for forward + backward in fp32 on the CPU). Extras: gradient checkpointing's cost, torch.compile
(--compile), and on CUDA bf16 autocast and the windowed-attention backends (flash-attn vs masked SDPA).

    python -m benchmarks.bench_dit --size small --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.specs import DIT_SIZES, diffusers_dit_kwargs, dit_config, dit_inputs
from benchmarks.timing import Row, add_common, goal_row, interleaved, main_of, median, ratio, spread
from model.attention import attention, window_backend
from model.config import PRESETS
from model.dit import DiT
from weights.wan_dit import convert_wan_dit

GOAL = 0.8


def reference_and_ours(cfg, device: torch.device) -> tuple[nn.Module, DiT]:
    """A random diffusers Wan DiT (every matrix random, the zero-initialized head included) and ours
    holding the same weights through the converter."""
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**diffusers_dit_kwargs(cfg))
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
    ours = DiT(cfg)
    ours.load_state_dict(convert_wan_dit(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref.to(device).train(), ours.to(device).train()


def fwd_bwd(model: nn.Module, call: Callable[[], torch.Tensor], autocast) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        with autocast():
            out = call()
        out.float().square().mean().backward()

    return step


def fwd(call: Callable[[], torch.Tensor], autocast) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast():
            call()

    return run


def attention_rows(args, device: torch.device, label: str, shape: tuple[int, int, int, int], window: int,
                   dtype: torch.dtype) -> list[Row]:
    """Windowed self-attention, forward + backward, at (batch, heads, tokens, head dim): whatever
    `attention()` picks vs the exact masked SDPA vs full attention (the cost the window should cut)."""
    b, heads, L, hd = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, L, hd, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    band = torch.ones(L, L, dtype=torch.bool, device=device).triu(-(window // 2)).tril(window // 2)
    calls = 10 if b * heads * L * L < 2**30 else 1  # short calls are repeated to be timeable

    def timed(fn):
        def run():
            for _ in range(calls):
                torch.autograd.grad(fn().sum(), (q, k, v))

        return run

    fns = {
        "attention()": timed(lambda: attention(q, k, v, window=window)),
        "masked SDPA": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band)),
        "full SDPA": timed(lambda: attention(q, k, v)),
    }
    s = interleaved(fns, repeats=args.repeats, warmup=max(args.warmup, 1), device=device)
    name = str(dtype).replace("torch.", "")
    what = f"{label}: window {window}/{L} tokens, {heads} heads x {hd}, {name}, fwd+bwd"
    backend = window_backend(q)
    return [
        Row("dit", f"attention {what}: attention() [{backend}] / masked SDPA",
            ratio(s["attention()"], s["masked SDPA"]),
            note=f"{calls} call(s): {spread(s['attention()'])} vs {spread(s['masked SDPA'])}"),
        Row("dit", f"attention {what}: attention() [{backend}] / full SDPA",
            ratio(s["attention()"], s["full SDPA"]),
            note=f"full {spread(s['full SDPA'])}; the band holds {band.float().mean().item():.0%} of pairs"),
    ]


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    size = DIT_SIZES[args.size]
    cfg = dit_config(size)
    ref, ours = reference_and_ours(cfg, device)
    x, t, context = dit_inputs(size, device)
    call_ours = lambda: ours(x, t, context)  # noqa: E731
    call_ref = lambda: ref(x, t * 1000, context, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        err = (call_ours() - call_ref()).abs().max().item()
    shape = f"{size.layers}x{size.dim}, {size.tokens} tokens, {size.text_len} text"
    plain = contextlib.nullcontext
    fns = {
        "ours": fwd_bwd(ours, call_ours, plain),
        "diffusers": fwd_bwd(ref, call_ref, plain),
        "ours fwd": fwd(call_ours, plain),
        "diffusers fwd": fwd(call_ref, plain),
    }
    if args.compile:  # regional: each block compiled (DiT.compile_blocks), on a copy with the same weights
        compiled = copy.deepcopy(ours)
        compiled.compile_blocks()
        fns["ours compiled"] = fwd_bwd(compiled, lambda: compiled(x, t, context), plain)

    def ours_ckpt() -> None:
        ours.gradient_checkpointing = True
        try:
            fns["ours"]()
        finally:
            ours.gradient_checkpointing = False

    fns["ours grad-ckpt"] = ours_ckpt
    s = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    rows = [
        goal_row(
            "dit",
            f"fwd+bwd ours / diffusers fp32 ({shape})",
            ratio(s["ours"], s["diffusers"]),
            at_most=GOAL,
            note=f"{spread(s['ours'])} vs {spread(s['diffusers'])}; outputs agree to {err:.1e}",
        ),
        Row(
            "dit",
            "fwd ours / diffusers fp32 (no grad)",
            ratio(s["ours fwd"], s["diffusers fwd"]),
            note=f"{spread(s['ours fwd'])} vs {spread(s['diffusers fwd'])}",
        ),
        Row(
            "dit",
            "fwd+bwd ours with grad checkpointing / without",
            ratio(s["ours grad-ckpt"], s["ours"]),
            note="recompute costs about one extra forward",
        ),
    ]
    if args.compile:
        rows.append(
            goal_row(
                "dit",
                "fwd+bwd ours compiled blocks / diffusers fp32",
                ratio(s["ours compiled"], s["diffusers"]),
                at_most=GOAL,
                note=f"{spread(s['ours compiled'])}; torch.compile is opt-in (DiT.compile_blocks)",
            )
        )
        rows.append(
            Row("dit", "fwd+bwd ours compiled blocks / ours eager", ratio(s["ours compiled"], s["ours"]))
        )
    if device.type == "cuda":
        rows += cuda_rows(args, device, size, ours, ref, call_ours, call_ref, s)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows += attention_rows(args, device, f"{args.size} size", (size.batch, size.heads, size.tokens,
                           size.dim // size.heads), size.tokens // 2, dtype)
    if device.type == "cuda":  # the paper's window at its real token count (121 frames 576x1024)
        paper = PRESETS["paper"].dit
        shape = (1, paper.heads, 9216, paper.head_dim)
        rows += attention_rows(args, device, "paper", shape, paper.window, dtype)
    return rows


def cuda_rows(args, device, size, ours, ref, call_ours, call_ref, fp32) -> list[Row]:
    """bf16 autocast (fp32 islands kept inside the model): ours vs diffusers, and vs our fp32."""
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    s = interleaved(
        {"ours": fwd_bwd(ours, call_ours, bf16), "diffusers": fwd_bwd(ref, call_ref, bf16)},
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
    )
    return [
        goal_row(
            "dit",
            "fwd+bwd ours / diffusers bf16 autocast",
            ratio(s["ours"], s["diffusers"]),
            at_most=GOAL,
            note=f"{spread(s['ours'])} vs {spread(s['diffusers'])}",
        ),
        Row("dit", "fwd+bwd ours bf16 autocast / ours fp32", median(s["ours"]) / median(fp32["ours"])),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main_of(run, build_parser()))
