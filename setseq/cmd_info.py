"""`setseq info`: what a user planning a run needs to know about a model, before any weights load.

Parameter counts of the DiT, VAE and text encoder (built on the meta device: nothing is
allocated, so the paper's 11.5B DiT is counted in a second), the latent shape and number of
video tokens of a clip, and an analytic estimate of training FLOPs per step (model/flops.py).
The model is a named preset (`--preset paper`) or a checkpoint folder holding config.json.
"""

from __future__ import annotations

import argparse
import json
import math

from model.config import ModelConfig, get_preset, parse_size
from model.flops import dit_forward_flops, dit_train_flops


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="parameter counts, latent shape, tokens and training FLOPs of a model",
        description="Parameter counts of DiT, VAE and text encoder, the latent shape and number of video "
                    "tokens of a clip, and an estimate of training FLOPs per step. Give --preset NAME or "
                    "a checkpoint folder holding config.json.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (with config.json) instead of --preset")
    p.add_argument("--preset", help="named model preset, e.g. tiny, paper, wan2.1-1.3b, wan2.1-14b")
    p.add_argument("--frames", type=int, help="clip length in frames (default: the model's own)")
    p.add_argument("--size", help="clip size HxW in pixels, e.g. 576x1024 (default: the model's own)")
    p.add_argument("--batch", type=int, default=1, help="samples per training step for the FLOP figure")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def load_model_config(preset: str | None, checkpoint: str | None) -> ModelConfig:
    """A preset by name, or the ModelConfig of a checkpoint folder (weights/checkpoint.py format)."""
    if (preset is None) == (checkpoint is None):
        raise ValueError("give either --preset NAME or a checkpoint folder, not both or neither")
    if preset is not None:
        return get_preset(preset)
    from weights.checkpoint import checkpoint_config

    return checkpoint_config(checkpoint)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of the three networks, built on the meta device (no memory is allocated)."""
    import torch

    from model.dit import DiT
    from model.t5 import T5Encoder
    from model.vae import VAE

    def count(ctor, sub_cfg) -> int:
        with torch.device("meta"):
            module = ctor(sub_cfg)
        return sum(p.numel() for p in module.parameters())

    # A two-expert base (Wan 2.2 A14B) holds two DiTs of one config.
    return {"dit_params": cfg.experts * count(DiT, cfg.dit), "vae_params": count(VAE, cfg.vae),
            "text_encoder_params": count(T5Encoder, cfg.t5)}


def collect(cfg: ModelConfig, frames: int, height: int, width: int, batch: int = 1) -> dict:
    """Everything `info` prints, as one JSON-ready dict."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    shape = cfg.latent_shape(frames, (height, width))
    tokens = math.prod(cfg.token_grid(frames, (height, width)))
    text_len = cfg.t5.max_length
    return {
        "model": cfg.name, "frames": frames, "height": height, "width": width,
        **param_counts(cfg),
        "latent_shape": list(shape), "video_tokens": tokens, "text_tokens": text_len,
        "window": cfg.dit.window, "batch": batch,
        "forward_flops_per_sample": dit_forward_flops(cfg.dit, tokens, text_len),
        "train_flops_per_step": batch * dit_train_flops(cfg.dit, tokens, text_len),
    }


def human(n: float) -> str:
    """11834000000 -> '11.83B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def flops_text(n: float) -> str:
    """5.156e14 -> '515.6 TFLOP' (SI prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


def params(n: int) -> str:
    return f"{human(n)} parameters ({n:,})"


def format_report(info: dict, cfg: ModelConfig) -> str:
    c, t, h, w = info["latent_shape"]
    pt, ph, pw = cfg.dit.patch
    window = "full self-attention" if info["window"] is None else f"self-attention window {info['window']:,}"
    step = info["train_flops_per_step"]
    rows = [
        ("model", info["model"]),
        ("video", f"{info['frames']} frames x {info['height']}x{info['width']} px (T x H x W)"),
        ("latent shape", f"{c} x {t} x {h} x {w} (C x T' x H' x W'), VAE compression "
                         f"{cfg.vae.time_compression}x{cfg.vae.space_compression}x{cfg.vae.space_compression}"),
        ("video tokens", f"{info['video_tokens']:,} (patch {pt}x{ph}x{pw}), {window}"),
        ("text tokens", f"{info['text_tokens']} (T5 max_length)"),
        ("DiT", params(info["dit_params"]) + _experts(cfg)),
        ("VAE", params(info["vae_params"]) + _vae_kind(cfg)),
        ("text encoder", params(info["text_encoder_params"])),
        ("train FLOPs", f"{flops_text(step)} per step at batch {info['batch']} ({step:.3g}; "
                        f"3 x forward, see model/flops.py)"),
    ]
    return "\n".join(f"{k:<14}{v}" for k, v in rows)


def _vae_kind(cfg: ModelConfig) -> str:
    """What sets a Wan 2.2 VAE apart, and what its base does with it."""
    if not cfg.vae.residual:
        return ""
    ti2v = cfg.name.startswith("wan2.2-ti2v")
    i2v = "; text- and image-to-video (generate --image: a first frame at t = 0)" if ti2v else ""
    return (f", Wan 2.2 layout: {cfg.vae.patch[1]}x{cfg.vae.patch[1]} space-to-depth stem, residual "
            f"resampling, {cfg.vae.latent_channels} latent channels{i2v}")


def size_report(info: dict, cfg: ModelConfig) -> str:
    """The rows no clip size changes, for a model that names no default clip when none is given."""
    rows = [("model", info["model"]),
            ("VAE compression", f"{cfg.vae.time_compression}x{cfg.vae.space_compression}x"
                                f"{cfg.vae.space_compression}, {cfg.vae.latent_channels} latent channels"),
            ("DiT", params(info["dit_params"]) + _experts(cfg)),
            ("VAE", params(info["vae_params"]) + _vae_kind(cfg)),
            ("text encoder", params(info["text_encoder_params"])),
            ("per clip", "latent shape, video tokens and FLOPs need --frames and --size HxW (this model "
                         "names no default clip)")]
    return "\n".join(f"{k:<16}{v}" for k, v in rows)


def _experts(cfg: ModelConfig) -> str:
    if cfg.experts == 1:
        return ""
    low = cfg.guidance if cfg.low_noise_guidance is None else cfg.low_noise_guidance
    return (f", 2 experts of one shape: high-noise for t >= {cfg.boundary:g} (guidance {cfg.guidance:g}), "
            f"low-noise below (guidance {low:g}); one runs per step")


def run(args: argparse.Namespace) -> int:
    cfg = load_model_config(args.preset, args.checkpoint)
    default = cfg.default_clip
    size = parse_size(args.size) if args.size is not None else None
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if default is None and (args.frames is None or size is None):  # only the per-clip rows need a clip
        if args.frames is not None:
            cfg.check_frames(args.frames)
        if size is not None:
            cfg.check_size(size)
        info = {"model": cfg.name, **param_counts(cfg)}
    else:
        frames = args.frames if args.frames is not None else default[0]
        info = collect(cfg, frames, *(size or default[1:]), args.batch)
    if args.checkpoint is not None:
        info["checkpoint"] = args.checkpoint
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_report(info, cfg) if "latent_shape" in info else size_report(info, cfg))
    if args.checkpoint is not None:  # what the folder holds: parts, dtype, source (no tensor data read)
        from weights.checkpoint import describe_checkpoint

        print("\n".join(describe_checkpoint(args.checkpoint)))
    return 0

