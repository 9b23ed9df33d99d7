"""Where the time of a real-size LoRA step goes, on a GPU: the same step as bench_personalize --real-size,
timed beside the frozen base's own forward + backward (input gradients only, no LoRA), then one step under
torch.profiler with the top CUDA kernels printed.

    python -m benchmarks.profile_real --preset wan2.1-1.3b
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_personalize import REAL_VIDEO, frozen_dit, real_inputs
from benchmarks.timing import interleaved, median
from model.config import PRESETS
from model.dit import DiT
from model.flow import add_noise, flow_loss_per_sample, velocity_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b", choices=sorted(REAL_VIDEO))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = PRESETS[args.preset].dit
    x0, eps, t, context, mask = real_inputs(args.preset, 1, torch.device("cuda"), torch.bfloat16)

    def step_of(dit: DiT, lora: bool):
        def step() -> None:
            x_t = add_noise(x0, eps, t).requires_grad_(not lora)  # no LoRA: input grads drive the backward
            with torch.autocast("cuda", dtype=torch.bfloat16):
                v = dit(x_t, t, context, context_mask=mask)
            flow_loss_per_sample(v, velocity_target(x0, eps)).mean().backward()

        return step

    lora_dit, base_dit = (frozen_dit(cfg, torch.device("cuda"), torch.bfloat16, lora=lora, checkpointing=True)
                          for lora in (True, False))
    fns = {"LoRA step": step_of(lora_dit, True), "frozen base fwd+bwd": step_of(base_dit, False)}
    s = interleaved(fns, repeats=args.repeats, warmup=1, device="cuda")
    for name, xs in s.items():
        print(f"{name}: {median(xs):.3f} s")
    print(f"LoRA step / frozen base: {median(s['LoRA step']) / median(s['frozen base fwd+bwd']):.3f}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fns["LoRA step"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
