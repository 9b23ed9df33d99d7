"""`setseq personalize`: learn a dynamic concept from one video (or several, jointly) into a concept file.

    setseq personalize dancer.mp4 --prompt "A [v] man in a cap on a bridge." \\
        --motion-prompt "He is performing [u] dancing motion." --base wan2.1-1.3b-dir --out dancer.safetensors

Both stages by default (--stage 1 or --stage 2 runs one; stage 2 alone continues a finished
`--stage 1` run of the same --out / --work-dir). The same options can come from a TOML file
(`--config run.toml`, see examples/personalize.toml), which is also how several concepts train
together into one adapter; flags given on the command line override the file. Under torchrun
(`torchrun --nproc-per-node N -m setseq personalize ...`) it trains data-parallel (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import fields
from pathlib import Path

import torch

from model.config import parse_size
from setseq.args import (
    add_memory_flags,
    check_folder,
    check_new_files,
    nonnegative_float,
    note_offload,
    positive_float,
    warn_unreadable,
)
from train import distributed
from train.config import ConceptSpec, PersonalizeConfig, read_toml_config
from train.personalize import Diverged, main
from train.preflight import check_clips
from train.recipe import RECIPES, config_unreadable_words, per_concept_budget, recipe, resolve, settings_lines
from train.resume import fresh_resume_note
from weights.base import base_config, check_memory_options, load_base

# TOML keys that choose the base and how it is held
_BASE_KEYS = ("base", "tokenizer", "dtype", "random_weights", "base_dtype", "offload_blocks")

# Flags mapped 1:1 onto PersonalizeConfig fields (argparse dest -> field), with their types.
_FLAGS: dict[str, tuple[type, str]] = {
    "steps1": (int, "stage-1 steps (paper: 600)"),
    "steps2": (int, "stage-2 steps (paper: 900; 2k-2.5k for complex motion or several concepts)"),
    "batch_size": (int, "items per step, prior-preservation items included (paper: 8)"),
    "rank": (int, "LoRA rank (high rank + B-dropout, paper 3.4.2); unset, per concept with several"),
    "lr": (positive_float, "learning rate of the LoRA (paper: 1e-4, constant)"),
    "token_lr": (nonnegative_float, "learning rate of the [v]/[u] embeddings (paper: 1e-5)"),
    "prior_count": (int, "prior-preservation generations per stage (0 = off)"),
    "prior_weight": (nonnegative_float, "weight of the prior-preservation loss"),
    "prior_per_batch": (int, "prior-preservation items of each batch"),
    "frame_time_shift": (positive_float, "flow-time shift of stage 1's training frames (unset: the clips')"),
    "frames": (int, "clip length in frames, 1 + k * the VAE's time compression (default: fit the video)"),
    "fps": (positive_float, "resample the video to this frame rate (default: its own)"),
    "seed": (int, "random seed (the same seed gives the same concept, resumed or not)"),
    "checkpoint_every": (int, "steps between training checkpoints"),
    "preview_every": (int, "write a short preview gif every N steps (0 = never)"),
    "name": (str, "concept name stored in the file"),
    "work_dir": (str, "checkpoints, caches, loss log, previews (default: OUT with suffix .work)"),
    "expert": (str, "two-expert bases (Wan 2.2 A14B): both, high or low (each trains on its own times)"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "personalize", help="learn a dynamic concept from a video (Set-and-Sequence, two stages)",
        description="Personalize a base video model on one video: stage 1 learns the identity basis from "
                    "unordered frames, stage 2 the motion residual from clips. Writes a concept file.")
    p.add_argument("video", nargs="?", help="the concept's video (mp4, mov, webm, gif, ...)")
    p.add_argument("--config", help="TOML file of the same options; [[concepts]] tables for several concepts")
    p.add_argument("--prompt", help='static prompt holding [v], e.g. "A [v] man in a cap on a bridge."')
    p.add_argument("--motion-prompt", help='dynamic prompt holding [u], e.g. "He does [u] dancing."')
    p.add_argument("--base", help="base model: a checkpoint folder (setseq convert), or a preset name with "
                   "committed weights (tiny: assets/tiny), or any preset with --random-weights")
    p.add_argument("--tokenizer", help="sentencepiece model, when the base checkpoint ships none")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="randomly initialized weights for a preset --base (tests, timing; nothing learned)")
    p.add_argument("--out", help="the concept file to write (.safetensors)")
    p.add_argument("--stage", type=int, choices=(1, 2), help="run one stage only (default: both)")
    p.add_argument("--size", help="frame size HxW in pixels, e.g. 480x832 (default: the video's, cropped)")
    for dest, (kind, text) in _FLAGS.items():
        flag = "--" + dest.replace("_", "-")
        p.add_argument(flag, dest=dest, type=kind, help=f"{text}{_default_text(dest)}")
    p.add_argument("--targets", nargs="+", metavar="REGEX",
                   help="LoRA target module patterns" + _default_text("targets"))
    p.add_argument("--full-prompt", help="the stage-2 text, when the motion words belong inside the sentence "
                   '(default: the prompt + the motion prompt; tiny: the motion prompt before " on a ")')
    p.add_argument("--no-train-tokens", dest="train_tokens", action="store_false", default=None,
                   help="keep the [v]/[u] embeddings at zero (the paper: works without training them)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="base weights dtype (default: bf16 on cuda)")
    add_memory_flags(p)
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block in the backward: less memory (real sizes need it), +1 forward")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each DiT block: faster steps after a compile of about a minute")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    p.add_argument("--force", action="store_true", default=None, help="overwrite an existing --out")
    p.set_defaults(func=run)


def _default_text(field: str) -> str:
    """' (default: X; tiny: Y)': the paper's default and any base recipe's own."""
    default = getattr(PersonalizeConfig, field, None)
    own = "".join(f"; {name}: {r[field]!r}" for name, r in RECIPES.items() if field in r)
    return f" (default: {default!r}{own})" if default is not None or own else ""


def _flag_values(args: argparse.Namespace) -> dict:
    """The PersonalizeConfig values the command line gave."""
    switches = ("train_tokens", "device", "resume", "force", "out", "grad_checkpointing", "compile")
    values = {d: getattr(args, d) for d in (*_FLAGS, *switches) if getattr(args, d, None) is not None}
    if args.size is not None:
        values["size"] = parse_size(args.size)
    if args.stage is not None:
        values["stages"] = (args.stage,)
    if args.targets is not None:
        values["targets"] = tuple(args.targets)
    if args.video is not None or args.prompt is not None:
        if args.video is None or args.prompt is None:
            raise ValueError("give both VIDEO and --prompt (or put [[concepts]] in --config)")
        values["concepts"] = [ConceptSpec(args.video, args.prompt, args.motion_prompt or "",
                                          full_prompt=args.full_prompt or "")]
    elif args.motion_prompt is not None or args.full_prompt is not None:
        raise ValueError("--motion-prompt and --full-prompt need VIDEO and --prompt beside them")
    return values


def build_config(args: argparse.Namespace) -> tuple[PersonalizeConfig, dict, dict]:
    """Flags over TOML over the base's recipe over the defaults -> (config, base options, provenance)."""
    toml, extra = read_toml_config(args.config, _BASE_KEYS)
    extra.update({k: getattr(args, k) for k in _BASE_KEYS if getattr(args, k) is not None})
    if "base" not in extra:
        raise ValueError("no --base given: a preset name (e.g. tiny) or a folder from `setseq convert`")
    base_cfg = base_config(extra["base"], bool(extra.get("random_weights")))  # refused before allocation
    defaults = {f.name: getattr(PersonalizeConfig, f.name) for f in fields(PersonalizeConfig)
                if hasattr(PersonalizeConfig, f.name)}
    defaults["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    settings = resolve(_flag_values(args), toml, recipe(base_cfg.name), defaults)
    values = {k: v for k, (v, _) in settings.items()}
    if not values.get("concepts"):
        raise ValueError("no concept given: pass VIDEO --prompt 'a [v] ...' or a --config with [[concepts]]")
    if "out" not in values:
        raise ValueError("no --out given: name the concept file to write, e.g. --out dancer.safetensors")
    settings = per_concept_budget(settings, PersonalizeConfig(**values))
    cfg = PersonalizeConfig(**{k: v for k, (v, _) in settings.items()})
    check_paths(cfg)
    return cfg, extra, settings


def check_paths(cfg: PersonalizeConfig) -> None:
    """A concept file to write and a work folder: refused now if they cannot be, not after the base loads
    (an existing --out without --force is the training loop's to refuse)."""
    if Path(cfg.out).suffix != ".safetensors":
        raise ValueError(f"--out {cfg.out!r} must end in .safetensors (the concept file)")
    check_new_files([Path(cfg.out)], "--out", force=True)
    check_folder(cfg.work, "--work-dir")


def run(args: argparse.Namespace) -> int:
    cfg, extra, settings = build_config(args)
    with distributed.process_group(cfg.device):  # under torchrun: joined before anything is on a device
        return _run(cfg, extra, settings)


def _run(cfg: PersonalizeConfig, extra: dict, settings: dict) -> int:
    main_proc = distributed.is_main_process()
    if main_proc:
        print("settings (and where each came from):\n" + "\n".join(settings_lines(settings)))
        if note := fresh_resume_note(cfg):
            print(f"setseq personalize: note: {note}", file=sys.stderr)
    base_cfg = base_config(extra["base"], bool(extra.get("random_weights")))
    check_memory_options(base_cfg, extra.get("base_dtype"), extra.get("offload_blocks") or 0,  # the flags,
                         compile=bool(cfg.compile), data_parallel=distributed.launched())
    check_clips(cfg, base_cfg)  # then the videos' headers, before the weights load
    base = load_base(extra["base"], device=cfg.device, dtype=extra.get("dtype"), seed=cfg.seed,
                     tokenizer=extra.get("tokenizer"), random_weights=bool(extra.get("random_weights")),
                     base_dtype=extra.get("base_dtype"), offload_blocks=extra.get("offload_blocks") or 0,
                     dit_on_host=distributed.launched(), dit_on_meta=not main_proc)  # rank 0 reads the DiT
    if main_proc:
        note_offload("personalize", extra.get("offload_blocks"), cfg.device)
        warn_unreadable("personalize", config_unreadable_words(cfg, base.tokenizer))
    from sample.sampler import sample_latents

    # priors and previews sample a two-expert base (Wan 2.2 A14B) at its own low-noise guidance too
    sample_fn = functools.partial(sample_latents, low_noise_guidance=base.config.low_noise_guidance)
    try:
        out = main(cfg, base, sample_fn=sample_fn)
    except Diverged as err:
        print(f"setseq personalize: error: {err}", file=sys.stderr)
        return 3
    if main_proc:
        print(f"wrote {out} (loss log: {Path(cfg.work) / 'loss.tsv'})")
    return 0
