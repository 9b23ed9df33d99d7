"""Measure a base model on captions it was never trained on, from pixels, every number beside its floor.

`evaluate_base` samples one video per prompt at each guidance scale, decodes it, and reads it with
toyworld/instruments.py: background, object colour, shape and motion accuracy (chance floors: uniform
and majority class), and motion quality per object: `smooth` = found in every frame with no
frame-to-frame jump over JUMP_PX (a jump means the object teleports between latent frames or
splits), `one_object` = exactly one connected blob per object slot in every frame. The reference
clips themselves are measured the same way (`reference` row: the instruments' ceiling), and so are
their VAE reconstructions (with their PSNR).

`evaluate_base` knows nothing of the toy world's generator: the caller passes prompts, the attributes
each prompt promises, reference videos and the vocabulary palettes. `heldout_report` is that caller
for a base and a world: it draws the world's held-out captions (`setseq pretrain`'s report,
benchmarks/colour_binding.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.tokenizer import Tokenizer
from sample.sampler import sample_latents
from toyworld.instruments import (
    as_frames,
    attribute_accuracy,
    centroids,
    max_jump,
    object_masks,
)
from toyworld.pretrain import caption_length
from toyworld.world import BACKGROUNDS, COLOURS, MOTIONS, generate_batch

JUMP_PX = 8.0  # the fastest toy motion (an orbit) moves 4.7 px a frame; linear paths 1.5 px


def to_uint8(video: Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    y = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 4, 1).cpu().numpy()


def psnr(video: Tensor, reference: Tensor) -> float:
    """PSNR (dB) of [-1, 1] videos on the [0, 1] scale."""
    mse = ((video.float().clamp(-1, 1) - reference.float()) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def _blobs(mask: np.ndarray) -> int:
    """Connected components (4-neighbour) of one (H, W) mask."""
    seen, count = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count, stack = count + 1, [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def motion_quality(videos: Sequence[np.ndarray], n_objects: Sequence[int]) -> dict[str, float]:
    """Fractions of videos whose every object is `smooth` and `one_object` (see the module doc), and
    the mean over objects of the largest frame-to-frame jump (px)."""
    smooth, single, jumps = [], [], []
    for video, n in zip(videos, n_objects, strict=True):
        frames = as_frames(video)
        ok_smooth = ok_single = True
        for mask in object_masks(frames, n):
            traj = centroids(mask)
            jump = max_jump(traj)
            jumps.append(jump)
            ok_smooth &= bool(not np.isnan(traj).any() and jump <= JUMP_PX)
            ok_single &= all(_blobs(m) == 1 for m in mask)
        smooth.append(ok_smooth)
        single.append(ok_single)
    return {"smooth": float(np.mean(smooth)), "one_object": float(np.mean(single)),
            "mean_max_jump_px": float(np.nanmean(jumps)) if np.any(~np.isnan(jumps)) else float("nan")}


def measure_videos(videos: Sequence[np.ndarray], intended: Sequence[Mapping], palettes: Mapping) -> dict:
    """Attribute accuracy (with floors) and motion quality of uint8 (T, H, W, 3) videos."""
    acc = attribute_accuracy(videos, intended, palettes["backgrounds"], palettes["colours"],
                             palettes["motions"])
    return {**acc, **motion_quality(videos, [len(w["objects"]) for w in intended])}


@torch.no_grad()
def generate(dit, vae, latent_shape: tuple[int, ...], context: Tensor, mask: Tensor,
             uncond: tuple[Tensor, Tensor], *, guidance: float, steps: int, shift: float, seed: int,
             batch: int = 32) -> Tensor:
    """Sample latents of `latent_shape` (C, T', H', W') for each context row and decode them:
    (N, 3, T, H, W) in [-1, 1]. Batch i's noise is seeded with seed + i."""
    out = []
    for i in range(0, len(context), batch):
        ctx, m = context[i : i + batch], mask[i : i + batch]
        z = sample_latents(dit, (len(ctx), *latent_shape), (ctx, m), uncond, steps=steps, guidance=guidance,
                           shift=shift, generator=torch.Generator().manual_seed(seed + i))
        out.append(vae.decode(z))
    return torch.cat(out)


@torch.no_grad()
def evaluate_base(dit, vae, encode_text: Callable[[list[str]], tuple[Tensor, Tensor]], prompts: list[str],
                  intended: list[Mapping], references: np.ndarray, palettes: Mapping, *,
                  guidances: Sequence[float] = (1.0, 3.0, 5.0), steps: int = 25, shift: float = 1.0,
                  seed: int = 0, batch: int = 32) -> tuple[dict, dict[float, np.ndarray]]:
    """Report (JSON-ready) and the generated uint8 videos per guidance.

    references: (N, T, H, W, 3) uint8 real clips of the prompts. palettes: {"backgrounds": name->RGB,
    "colours": name->RGB, "motions": [names]}.
    """
    ref = torch.from_numpy(references).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (N, 3, T, H, W)
    recon = torch.cat([vae.decode(vae.encode(ref[i : i + batch])) for i in range(0, len(ref), batch)])
    report = {"n": len(prompts), "steps": steps, "shift": shift, "seed": seed,
              "vae_psnr_db": psnr(recon, ref),
              "reference": measure_videos(list(references), intended, palettes),
              "reconstruction": measure_videos(list(to_uint8(recon)), intended, palettes),
              "guidance": {}}
    context, mask = encode_text(prompts)
    uncond = encode_text([""])
    latent_shape = tuple(vae.encode(ref[:1]).shape[1:])  # sampled videos match the references' size
    videos = {}
    for g in guidances:
        video = to_uint8(generate(dit, vae, latent_shape, context, mask, uncond, guidance=g, steps=steps,
                                  shift=shift, seed=seed, batch=batch))
        videos[g] = video
        report["guidance"][str(g)] = measure_videos(list(video), intended, palettes)
    return report, videos


def heldout_report(models, world, world_seed: int, seed: int, n: int, steps: int,
                   guidance: list[float]) -> tuple[dict, dict, object]:
    """Sample `n` held-out captions of `world` (drawn with `world_seed`; noise seeded with `seed`) with a
    base's parts (`models`: .cfg, .dit, .vae, .t5, .tokenizer_path) -> (report, videos, the caption batch)."""
    batch = generate_batch(n, seed=world_seed, split="heldout", cfg=world)
    tokenizer = Tokenizer(models.tokenizer_path)
    length = caption_length(tokenizer, models.cfg.t5.max_length)

    def encode_text(texts: list[str]):
        ids, mask = tokenizer.encode(texts, length)
        return models.t5(ids, mask.bool()), mask.bool()

    palettes = {"backgrounds": BACKGROUNDS, "colours": COLOURS, "motions": MOTIONS}
    intended = [c.attributes() for c in batch.clips()]
    report, videos = evaluate_base(models.dit, models.vae, encode_text, batch.captions, intended, batch.video,
                                   palettes, guidances=guidance, steps=steps, shift=models.cfg.sample_shift,
                                   seed=seed)
    return report, videos, batch


def contact_sheet(rows: Sequence[np.ndarray], frames: Sequence[int] = (0, 4, 8, 12, 16), gap: int = 2
                  ) -> np.ndarray:
    """One row per video (T, H, W, 3) uint8 showing `frames`, on a white grid: (rows*(H+gap), ...)."""
    h, w = rows[0].shape[1:3]
    sheet = np.full((len(rows) * (h + gap), len(frames) * (w + gap), 3), 255, np.uint8)
    for r, video in enumerate(rows):
        for c, f in enumerate(frames):
            y, x = r * (h + gap), c * (w + gap)
            sheet[y : y + h, x : x + w] = video[min(f, len(video) - 1)]
    return sheet


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def report_markdown(report: Mapping) -> str:
    """A table per the report: accuracy per attribute and motion quality, floors and ceilings beside."""
    rows = [("reference (real clips)", report["reference"]), ("VAE reconstruction", report["reconstruction"])]
    rows += [(f"generated, guidance {g}", r) for g, r in report["guidance"].items()]
    attrs = ("background", "colour", "pair_colour", "shape", "motion")
    names = {"pair_colour": "colour, two-object scenes"}
    lines = [f"# Base model on held-out captions ({report['n']} prompts, {report['steps']} Euler steps)", "",
             f"VAE reconstruction PSNR on these clips: {report['vae_psnr_db']:.2f} dB", "",
             "| videos | " + " | ".join(names.get(a, a) for a in attrs)
             + " | smooth | one object | mean max jump (px) |",
             "|---" * (len(attrs) + 4) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r[a]["accuracy"]) for a in attrs)
                     + f" | {_fmt(r['smooth'])} | {_fmt(r['one_object'])} | {_fmt(r['mean_max_jump_px'])} |")
    ref = report["reference"]
    lines.append("| chance (uniform / majority) | " + " | ".join(
        f"{ref[a]['uniform']:.2f} / {ref[a]['majority']:.2f}" for a in attrs) + " | 0 | 0 | - |")
    lines += ["", f"smooth: every object found in every frame, no step over {JUMP_PX:g} px; one object: one "
              "connected blob per object slot in every frame; colour, two-object scenes: colour of the "
              f"{ref['pair_colour']['n']} objects of two-object prompts alone (the caption's first object is "
              "the left one, so a scene drawn with its sides swapped gets both wrong; sides at random score "
              "0.50, and a few pairs say little: benchmarks/colour_binding.py samples more). The reference "
              "row is the instruments' ceiling."]
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path, report: Mapping, videos: Mapping[float, np.ndarray],
                 references: np.ndarray, prompts: Sequence[str], show: int = 8) -> None:
    """metrics.json, report.md and samples.png (rows: reference, then each guidance, per prompt)."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    md = report_markdown(report) + "\nsamples.png rows, per prompt: the real clip, then guidance " \
        + ", ".join(str(g) for g in videos) + ". Prompts:\n\n" \
        + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts[:show])) + "\n"
    (folder / "report.md").write_text(md)
    rows = []
    for i in range(min(show, len(references))):
        rows += [references[i]] + [v[i] for v in videos.values()]
    iio.imwrite(folder / "samples.png", contact_sheet(rows))


__all__ = ["evaluate_base", "heldout_report", "measure_videos", "motion_quality", "contact_sheet",
           "report_markdown", "write_report", "psnr", "JUMP_PX"]
