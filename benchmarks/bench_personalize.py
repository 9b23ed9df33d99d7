"""Personalization step cost and peak memory (train/personalize.py's loop body, timed).

A personalization step = draw a batch of cached latents (concept + prior items), look up cached T5
outputs (re-encoding through T5 only the prompts that hold a trained token), caption dropout, token
masking, flow matching, LoRA forward + backward, gradient clipping, AdamW. Its cost is compared with
a bare forward + backward of the same LoRA-injected DiT on the same shape with inputs made in advance:
caching must make data, VAE and T5 nearly free (goal step / bare <= 1.1). Peak memory: resident set
(VmHWM) on the CPU, torch.cuda.max_memory_allocated on CUDA, with and without gradient checkpointing.

`--real-size PRESET` instead times one step of a real-size base (wan2.1-1.3b at 81 frames 480x832,
paper at 121 frames 576x1024, ...) with its text already encoded (T5 not loaded): bf16 autocast and
bf16 frozen weights on CUDA, LoRA rank 32, gradient checkpointing; step time and peak memory.
`--real-size tiny` runs that path on the CPU in seconds (to check the script, not to measure).

    python -m benchmarks.bench_personalize --size small --threads 1 --repeats 5
    python -m benchmarks.bench_personalize --device cuda --real-size wan2.1-1.3b --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from pathlib import Path

import torch

from benchmarks.specs import DIT_SIZES, dit_config
from benchmarks.timing import (
    Row,
    add_common,
    current_bytes,
    goal_row,
    interleaved,
    main_of,
    median,
    peak_bytes,
    ratio,
    reset_peak,
    spread,
)
from lora.inject import DEFAULT_TARGETS, inject_lora, set_stage
from lora.tokens import AddedTokens, add_tokens
from model.base import Base
from model.config import PRESETS, ModelConfig, T5Config, VAEConfig
from model.dit import DiT
from model.flops import dit_forward_flops, dit_frozen_step_flops
from model.flow import add_noise, flow_loss_per_sample, velocity_target
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer, train_tokenizer
from model.vae import VAE
from train.config import ConceptSpec, PersonalizeConfig
from train.data import mask_tokens
from train.prior import PriorSet
from train.stage_data import StageData, batch_context, build_stage_data, draw_batch
from train.step import build_optimizer, loss_step, trained_params

GOAL = 1.1
MB = 2**20
REAL_VIDEO = {
    "tiny": (17, 64, 64),
    "wan2.1-1.3b": (81, 480, 832),
    "wan2.1-14b": (81, 480, 832),
    "paper": (121, 576, 1024),
}
WORDS = (
    "a the of in on over with and is red green blue square circle moving left right up down "
    "background grey dark camera static slowly quickly sprite motion video"
).split()


# ------------------------------------------------------------------------------------- the setup


def make_tokenizer(folder: Path, vocab: int) -> Tokenizer:
    sentences = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 8)) for i in range(300)]
    return Tokenizer(train_tokenizer(sentences, folder / "spiece.model", vocab_size=96), first_added_id=vocab)


def make_base(size, folder: Path, device: torch.device) -> Base:
    """A random base at the benchmark DiT size; the VAE and T5 are small (the loop never runs the VAE;
    T5 runs only for prompts holding a trained token)."""
    dit_cfg = dit_config(size)
    t5_cfg = T5Config(
        vocab_size=128,
        dim=dit_cfg.text_dim,
        head_dim=64,
        heads=4,
        ffn_dim=2 * dit_cfg.text_dim,
        layers=2,
        max_length=size.text_len,
    )
    vae_cfg = VAEConfig(
        latent_channels=16,
        base_channels=8,
        channel_mult=(1, 2),
        encoder_blocks=(1, 1),
        decoder_blocks=(1, 1),
        time_strides=(2, 1),
        space_strides=(2, 1),
        norm_groups=4,
    )
    mc = ModelConfig(name="bench", dit=dit_cfg, vae=vae_cfg, t5=t5_cfg)
    torch.manual_seed(0)
    dit = DiT(dit_cfg)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # like a trained head (zero: no gradient flows)
    base = Base(
        mc,
        dit.to(device),
        VAE(vae_cfg).to(device),
        T5Encoder(t5_cfg).to(device),
        make_tokenizer(folder, t5_cfg.vocab_size),
        "bench",
    )
    return base


def stage_data(
    cfg: PersonalizeConfig, base: Base, size, tokens: AddedTokens, stage: int
) -> StageData:
    """Cached latents as the loop sees them: 8 concept clips and 4 prior generations of the bench shape."""
    g = torch.Generator().manual_seed(1)
    singles = [torch.randn(8, 16, *size.latent, generator=g)]
    prior = PriorSet(
        torch.randn(4, 16, *size.latent, generator=g), ["a red square on a grey background."] * 4
    )
    return build_stage_data(cfg, base, stage, singles, [], prior, tokens)


class Setup:
    """Base + adapter + stage data + optimizer, as run_stage holds them."""

    def __init__(self, size, device: torch.device, folder: Path, train_tokens: bool, checkpointing: bool):
        self.device, self.size = device, size
        self.cfg = PersonalizeConfig(
            concepts=[
                ConceptSpec("unused.mp4", "a [v] square on a grey background.", "it is [u] moving left.")
            ],
            out=str(folder / "c.safetensors"),
            batch_size=2 * size.batch,
            prior_count=4,
            prior_per_batch=size.batch,
            rank=32,
            train_tokens=train_tokens,
            progress=False,
            device=str(device),
            grad_checkpointing=checkpointing,
        )
        self.base = base = make_base(size, folder, device)
        base.t5.requires_grad_(False).eval()
        base.vae.requires_grad_(False).eval()
        base.dit.requires_grad_(False)
        self.tokens = add_tokens(base.t5, base.tokenizer, self.cfg.tokens())
        base.t5.token_embedding.register_forward_hook(self.tokens.hook)
        inject_lora(base.dit, self.cfg.targets, self.cfg.rank, name=self.cfg.name)
        base.dit.gradient_checkpointing = checkpointing
        base.dit.train()
        self.data = stage_data(self.cfg, base, size, self.tokens, stage=2)
        lora, emb = trained_params(self.cfg, base.dit, self.tokens, 2)
        self.params = lora + emb
        self.optimizer = build_optimizer(self.cfg, lora, emb)
        self.g = torch.Generator(device).manual_seed(0)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext
        )

    def step(self) -> None:
        """run_stage's loop body, logging and checkpoints left out."""
        cfg = self.cfg
        with self.autocast():
            out = loss_step(cfg, self.base.dit, self.base.t5, self.data, self.g, shift=3.0)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True))
        self.optimizer.step()

    def data_only(self) -> None:
        """A step's work before the DiT: draw, context (T5 for trained-token prompts), masking, noise."""
        cfg, data, g = self.cfg, self.data, self.g
        batch = draw_batch(cfg, data, g)
        context, mask = batch_context(data, batch.prompt, self.base.t5, bool(data.trained_ids))
        mask_tokens(context, mask, cfg.token_mask_prob, g)
        add_noise(
            batch.x0, torch.randn(batch.x0.shape, generator=g, device=self.device), torch.rand(len(batch.x0))
        )

    def bare(self):
        """Forward + backward of the same DiT on the same shape, every input made in advance."""
        n = self.cfg.batch_size
        g = torch.Generator().manual_seed(2)
        x0 = torch.randn(n, 16, *self.size.latent, generator=g).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.rand(n, generator=g).to(self.device)
        x_t, target = add_noise(x0, eps, t), velocity_target(x0, eps)
        rows = torch.full((n,), 1, device=self.device)
        context, mask = self.data.prompts.context[rows], self.data.prompts.mask[rows]
        params = self.params

        def run() -> None:
            for p in params:
                p.grad = None
            with self.autocast():
                v = self.base.dit(x_t, t, context, context_mask=mask)
            flow_loss_per_sample(v, target).mean().backward()

        return run


def peak_of(fn, device: torch.device, calls: int = 2) -> tuple[int, int, bool]:
    """(peak bytes over `calls` calls after one warm call, bytes held before them, whether the peak
    window could be reset)."""
    fn()
    exact = reset_peak(device)
    before = current_bytes(device)
    for _ in range(calls):
        fn()
    return peak_bytes(device), before, exact


# ------------------------------------------------------------------------------------- benchmarks


def run(args: argparse.Namespace) -> list[Row]:
    if args.real_size:
        return run_real_size(args)
    device = torch.device(args.device)
    size = dataclasses.replace(DIT_SIZES[args.size], batch=args.batch)
    shape = f"{size.layers}x{size.dim}, {size.tokens} tokens x {2 * size.batch} items"
    with tempfile.TemporaryDirectory() as tmp:
        main = Setup(size, device, Path(tmp) / "a", train_tokens=True, checkpointing=False)
        frozen_text = Setup(size, device, Path(tmp) / "b", train_tokens=False, checkpointing=False)
        fns = {
            "step": main.step,
            "bare": main.bare(),
            "step (tokens frozen)": frozen_text.step,
            "bare (tokens frozen)": frozen_text.bare(),
            "data only": main.data_only,
        }
        if args.compile:
            main.base.dit.compile_blocks()
        s = interleaved(fns, repeats=args.repeats, warmup=max(args.warmup, 1), device=device)
        rows = [
            goal_row(
                "personalize",
                f"step / bare DiT fwd+bwd ({shape}, trained tokens)",
                ratio(s["step"], s["bare"]),
                at_most=GOAL,
                note=f"{spread(s['step'])} vs {spread(s['bare'])}; the step re-encodes the concept prompt "
                "through T5 (grad to [u]), draws, clips, AdamW",
            ),
            goal_row(
                "personalize",
                "step / bare, token embeddings frozen (T5 fully cached)",
                ratio(s["step (tokens frozen)"], s["bare (tokens frozen)"]),
                at_most=GOAL,
                note=spread(s["step (tokens frozen)"]),
            ),
            Row(
                "personalize",
                "data only (draw, cached context, masking, noise) / bare",
                ratio(s["data only"], s["bare"]),
                note=spread(s["data only"]),
            ),
        ]
        del main, frozen_text
        rows += memory_rows(size, device, Path(tmp))
    return rows


def memory_rows(size, device: torch.device, folder: Path) -> list[Row]:
    rows = []
    kind = "peak allocated" if device.type == "cuda" else "peak RSS"
    for ckpt in (False, True):
        setup = Setup(size, device, folder / f"m{int(ckpt)}", train_tokens=True, checkpointing=ckpt)
        peak, before, exact = peak_of(setup.step, device)
        note = (
            "gradient checkpointing per block" if ckpt else "no checkpointing"
        ) + f"; {max(0, peak - before) / MB:.0f} MiB above the {before / MB:.0f} MiB held between steps"
        if not exact:
            note += "; /proc/self/clear_refs not writable: lifetime peak of the process"
        rows.append(Row("personalize", f"{kind} of personalization steps", peak / MB, unit="MiB", note=note))
        del setup
    return rows


def frozen_dit(cfg, device: torch.device, dtype: torch.dtype, *, lora: bool, checkpointing: bool) -> DiT:
    """A random base DiT built directly in its storage dtype on the device, frozen, in train mode; with
    `lora`, a rank-32 adapter in stage 2 (the trained part of a real personalization step)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dit = DiT(cfg)
    finally:
        torch.set_default_dtype(previous)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # a zero head passes no gradient
    dit.requires_grad_(False)
    if lora:
        inject_lora(dit, DEFAULT_TARGETS, 32, name="concept")
        set_stage(dit, 2, concepts=["concept"], dropout=0.5)
    dit.gradient_checkpointing = checkpointing
    return dit.train()


def real_inputs(preset: str, batch: int, device: torch.device, dtype: torch.dtype):
    """(x0, eps, t, context, mask) of a real-size step: REAL_VIDEO[preset]'s latent, cached text of the
    T5 length (at most 512) in `dtype`, a typical prompt's mask (40 real tokens, the rest padding)."""
    mc = PRESETS[preset]
    frames, h, w = REAL_VIDEO[preset]
    tc, sc = mc.vae.time_compression, mc.vae.space_compression
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, mc.dit.in_channels, 1 + (frames - 1) // tc, h // sc, w // sc, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(batch, generator=g)
    text_len = min(512, mc.t5.max_length)
    context = torch.randn(batch, text_len, mc.dit.text_dim, generator=g).to(device, dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    mask[:, 40:] = False
    return x0.to(device), eps.to(device), t.to(device), context, mask


def lora_step(dit: DiT, inputs, device: torch.device, *, fused: bool = False):
    """One LoRA training step of `dit` on cached inputs (x0, eps, t, context, mask): AdamW on the
    trainable parameters, bf16 autocast on CUDA, clipped as personalization clips."""
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, fused=fused or None)
    x0, eps, t, context, mask = inputs
    cuda = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            v = dit(add_noise(x0, eps, t), t, context, context_mask=mask)
        flow_loss_per_sample(v, velocity_target(x0, eps)).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05, foreach=True)
        opt.step()

    return step


def run_real_size(args: argparse.Namespace) -> list[Row]:
    """One LoRA training step of a real-size base with cached text: time and peak memory."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    mc = PRESETS[args.real_size]
    cfg = mc.dit
    frames, h, w = REAL_VIDEO[args.real_size]
    if not cuda and args.real_size != "tiny":
        raise SystemExit(f"--real-size {args.real_size} is a GPU benchmark; on the CPU only --real-size tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    dit = frozen_dit(cfg, device, dtype, lora=True, checkpointing=not args.no_checkpointing)
    if args.compile:
        dit.compile_blocks()
    inputs = real_inputs(args.real_size, args.batch, device, dtype)
    latent, text_len = inputs[0].shape[2:], inputs[3].shape[1]
    step = lora_step(dit, inputs, device, fused=True)
    peak, base_mem, exact = peak_of(step, device, calls=1)
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    mm_n = 8192 if cuda else 512
    a, b = (torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype) for _ in range(2))
    mm_calls = 20  # one product is too short to time beside a seconds-long step (clock ramp, launch)
    s = interleaved({"step": step, "matmul": lambda: [torch.mm(a, b) for _ in range(mm_calls)]},
                    repeats=args.repeats, warmup=1, device=device)
    tokens = latent[0] * (latent[1] // cfg.patch[1]) * (latent[2] // cfg.patch[2])
    # Frozen base: products with a weight get their input gradient only, attention's get both
    # (model/flops.py); checkpointing recomputes one forward (hardware, not model, FLOPs).
    model_flops = dit_frozen_step_flops(cfg, tokens, text_len) * args.batch
    recompute = 0 if args.no_checkpointing else dit_forward_flops(cfg, tokens, text_len) * args.batch
    done_flops = model_flops + recompute
    peak_flops = 2 * mm_n**3 * mm_calls / median(s["matmul"])
    mfu = model_flops / median(s["step"]) / peak_flops
    what = f"{args.real_size}, {frames}x{h}x{w} -> {tokens} tokens, batch {args.batch}"
    ckpt = "off" if args.no_checkpointing else "per block"
    return [
        Row(
            "personalize-real",
            f"LoRA step time ({what})",
            median(s["step"]),
            unit="s",
            note=f"{dtype} weights, {'bf16 autocast' if cuda else 'fp32'}, checkpointing {ckpt}; T5 not run",
        ),
        Row(
            "personalize-real",
            "MFU of the LoRA step (model FLOPs / step time / dense matmul)",
            mfu,
            unit="",
            note=f"{model_flops / 1e12:.1f} TFLOP model, {done_flops / 1e12:.1f} done (with recompute: "
            f"{done_flops / median(s['step']) / peak_flops:.2f}); {mm_dtype} {mm_n}^3 matmul "
            f"{peak_flops / 1e12:.0f} TFLOP/s",
        ),
        Row(
            "personalize-real",
            "peak memory of the step",
            peak / MB,
            unit="MiB",
            note=("max_memory_allocated" if cuda else "peak RSS")
            + ("" if exact else " (lifetime)")
            + f"; {base_mem / MB:.0f} MiB held between steps (weights, optimizer state, inputs)",
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(parser)
    parser.add_argument(
        "--batch", type=int, default=1, help="concept items per step (plus as many prior items)"
    )
    parser.add_argument(
        "--real-size",
        choices=sorted(REAL_VIDEO),
        default=None,
        help="time one step of a real-size base instead (GPU; 'tiny' checks the path on a CPU)",
    )
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="real size: no gradient checkpointing"
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main_of(run, build_parser()))
