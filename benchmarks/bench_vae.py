"""Our VAE vs diffusers' AutoencoderKLWan: same config, same (converted) weights, same video.

Encode (posterior mean) and decode, no grad, fp32, interleaved in one process; goal ours / reference
<= 0.8 for each. diffusers streams (frame 0, then chunks of 4 frames through a feature cache; decode
one latent frame at a time); ours runs the whole clip at once with `chunk=None`, and `chunk=` streams the
same way: both are timed, so the table shows what streaming costs and what the whole-clip path buys.
generate and personalize pass `chunk="auto"`: whole up to 9x64x64 pixel-frames (the `small` size here),
streamed above (the `large` size), following these tables (model/vae.py STREAM_ABOVE).

    python -m benchmarks.bench_vae --size small --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.specs import VAE_SIZES, diffusers_vae_kwargs
from benchmarks.timing import Row, add_common, goal_row, interleaved, main_of, ratio, spread
from model.vae import VAE
from weights.wan_vae import convert_wan_vae, vae_config_from_diffusers

GOAL = 0.8


def reference_and_ours(size, device: torch.device) -> tuple[nn.Module, VAE]:
    """A random AutoencoderKLWan (norm gains too) and ours holding the same weights via the converter."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**diffusers_vae_kwargs(size)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = VAE(cfg).eval()
    ours.load_state_dict(convert_wan_vae(ref.state_dict(), "diffusers", cfg), strict=True)
    return ref.to(device), ours.to(device)


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    size = VAE_SIZES[args.size]
    ref, ours = reference_and_ours(size, device)
    frames, h, w = size.video
    video = (torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    with torch.no_grad():
        z = ours.encode_dist(video)[0]  # raw latent: diffusers' decode takes it un-normalized
        err_enc = (z - ref.encode(video).latent_dist.mean).abs().max().item()
        err_dec = (ours.decode_raw(z).clamp(-1, 1) - ref.decode(z).sample).abs().max().item()  # both clamp
    fns = {
        "ours encode": lambda: ours.encode_dist(video),
        "ours encode streamed": lambda: ours.encode_dist(video, chunk=4),
        "diffusers encode": lambda: ref.encode(video),
        "ours decode": lambda: ours.decode_raw(z),
        "ours decode streamed": lambda: ours.decode_raw(z, chunk=1),
        "diffusers decode": lambda: ref.decode(z),
    }
    if args.compile:
        encode, decode = torch.compile(ours.encode_dist), torch.compile(ours.decode_raw)  # `ours` stays eager
        fns["ours encode compiled"] = lambda: encode(video)
        fns["ours decode compiled"] = lambda: decode(z)
    with torch.no_grad():
        s = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    shape = f"base {size.base}, {frames}x{h}x{w}"
    rows = []
    for op, err in (("encode", err_enc), ("decode", err_dec)):
        ours_t, ref_t, streamed = s[f"ours {op}"], s[f"diffusers {op}"], s[f"ours {op} streamed"]
        rows.append(
            goal_row(
                "vae",
                f"{op} ours / diffusers fp32 ({shape})",
                ratio(ours_t, ref_t),
                at_most=GOAL,
                note=f"{spread(ours_t)} vs {spread(ref_t)}; agree to {err:.1e}",
            )
        )
        rows.append(
            goal_row(
                "vae",
                f"{op} ours streamed like diffusers / diffusers",
                ratio(streamed, ref_t),
                at_most=GOAL,
                note=spread(streamed),
            )
        )
        if args.compile:
            rows.append(
                Row(
                    "vae",
                    f"{op} torch.compile(ours) / diffusers",
                    ratio(s[f"ours {op} compiled"], ref_t),
                    note=spread(s[f"ours {op} compiled"]),
                )
            )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main_of(run, build_parser()))
