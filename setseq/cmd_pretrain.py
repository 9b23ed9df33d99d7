"""`setseq pretrain`: train the tiny base model on the toy world on a CPU, save it, measure it.

    setseq pretrain --preset tiny --out assets/tiny

Stages (toyworld/pretrain.py; saved and measured by toyworld/build_base.py): VAE, sentencepiece
tokenizer, latent bank, DiT (+ text encoder), layout. Rerunning the same command resumes from the newest
checkpoint in --work-dir. The result is a checkpoint folder (`--base DIR` for every other command)
holding config.json, the three parts, tokenizer.model, pretrain.json (the pretraining config, seed and
wall time), pretrain.log (the training log) and, unless --eval-samples 0, the evaluation on held-out
captions: metrics.json, report.md, samples.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from setseq.args import check_folder, nonnegative_float, positive_float, probability
from toyworld.build_base import Evaluation, build_base
from toyworld.pretrain import PretrainConfig, config_for_preset

# Flags mapped 1:1 onto PretrainConfig fields.
_FLAGS: dict[str, tuple[type, str]] = {
    "seed": (int, "random seed (the same seed reproduces the weights within noise)"),
    "threads": (int, "CPU threads for torch"),
    "vae_steps": (int, "VAE steps on crops"),
    "vae_full_steps": (int, "VAE steps on whole clips after the crops"),
    "bank_size": (int, "training clips encoded once for the DiT"),
    "dit_steps": (int, "DiT steps"),
    "batch": (int, "DiT batch"),
    "lr": (positive_float, "DiT peak learning rate (cosine)"),
    "ema": (probability, "EMA decay of the saved DiT"),
    "self_cond_prob": (probability, "self-conditioning probability in training"),
    "time_dist": (str, "training time distribution: logit_normal or uniform"),
    "time_shift": (positive_float, "shift training times toward noise, t' = s t / (1 + (s - 1) t) (1 = none; "
                         "default: the preset's sampling shift)"),
    "head_hidden": (int, "width of an MLP beside the DiT's Linear head (trained alone after the DiT; "
                           "with it: --head-joint)"),
    "head_steps": (int, "steps of that head MLP (0 = leave it at its zero init)"),
    "head_lr": (positive_float, "the head MLP's peak learning rate (cosine)"),
    "layout_steps": (int, "steps of the layout stage after the DiT (0 = none): the T5 gains an absolute "
                          "position and half of each batch trains near pure noise, where only the caption "
                          "places the objects"),
    "layout_share": (probability, "share of each layout-stage batch at times in (layout_t, 1)"),
    "layout_t": (probability, "lower end of those times"),
    "layout_lr": (positive_float, "the layout stage's peak learning rate (cosine)"),
    "checkpoint_every": (int, "steps between checkpoints"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain the tiny base model on the toy world (CPU)",
                              description="Train VAE, tokenizer/text encoder and DiT on the toy world; save "
                                          "a checkpoint folder and an evaluation on held-out captions.")
    p.add_argument("--preset", default="tiny", help="model preset (only 'tiny' is meant for a CPU)")
    p.add_argument("--out", default="assets/tiny", help="checkpoint folder to write")
    p.add_argument("--work-dir", help="checkpoints and logs (default: runs/pretrain-<preset>)")
    p.add_argument("--frozen-text", action="store_true", help="keep the T5 at its seeded random init")
    p.add_argument("--head-joint", action="store_true",
                   help="train the --head-hidden MLP with the DiT from step 0 instead of alone after it")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out prompts to evaluate (0 = none)")
    p.add_argument("--eval-steps", type=int, default=25, help="Euler steps per evaluation sample")
    p.add_argument("--guidance", type=nonnegative_float, nargs="+", default=[1.0, 3.0, 5.0],
                   help="guidance scales")
    for dest, (kind, text) in _FLAGS.items():
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, help=text)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    values = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.frozen_text:
        values["train_text"] = False
    if args.head_joint:
        values["head_joint"] = True
    work_dir = args.work_dir or f"runs/pretrain-{args.preset}"
    return config_for_preset(args.preset, work_dir=work_dir, **values)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    evaluation = Evaluation(args.eval_samples, args.eval_steps, tuple(args.guidance))
    cfg = config_from_args(args)
    check_folder(out, "--out")  # before hours of training, not at the save
    check_folder(Path(cfg.work_dir), "--work-dir")
    report = build_base(cfg, out, evaluation)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)")
    if report is not None:
        print((out / "report.md").read_text())
        print(f"VAE PSNR {report['vae_psnr_db']:.2f} dB")
    return 0
