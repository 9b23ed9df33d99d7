"""Our own checkpoint folder, the one format every command loads a base model from.

    DIR/config.json                  format name + version, ModelConfig.to_dict(), part files, dtype, source
    DIR/dit.safetensors              DiT state dict (our module names)
    DIR/vae.safetensors              VAE state dict
    DIR/text_encoder.safetensors     T5 encoder state dict
    DIR/dit_low.safetensors          two-expert bases (Wan 2.2 A14B): the low-noise expert; dit = high-noise
    DIR/tokenizer.model              optional: the sentencepiece model the T5 was trained with
    DIR/added_tokens.json            optional: tokens appended after the sentencepiece vocab, in id order

Each file is written atomically and config.json last, so a folder with a config.json is complete.
Loading is strict (`weights.load.load_into`): every key, every shape, or a ValueError naming the file.
`weights.base.load_base` turns a `--base` argument into a loaded base.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig

from .io import (
    read_safetensors,
    read_safetensors_header,
    read_safetensors_meta,
    write_atomic,
    write_json_atomic,
    write_safetensors_atomic,
)
from .load import load_into, parse_dtype, random_init

FORMAT = "setseq-checkpoint"
FORMAT_VERSION = 1
PARTS = ("dit", "vae", "t5")
PART_FILES = {"dit": "dit.safetensors", "vae": "vae.safetensors", "t5": "text_encoder.safetensors"}
# A two-expert base's low-noise DiT: not a part a user names; it travels with "dit" (expert_parts).
LOW_EXPERT = "dit_low"
FILES = {**PART_FILES, LOW_EXPERT: "dit_low.safetensors"}  # every file a folder may hold
TOKENIZER_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class BaseModels:
    """What a base loader returns: the config and the parts asked for (None for the others)."""

    cfg: ModelConfig
    dit: nn.Module | None = None
    vae: nn.Module | None = None
    t5: nn.Module | None = None
    tokenizer_path: Path | None = None  # sentencepiece model file, when the checkpoint ships one
    added_tokens: list[str] = dataclasses.field(default_factory=list)
    source: str = ""  # the folder, or "preset NAME (random init, seed S)"


def expert_parts(cfg: ModelConfig, parts: Sequence[str]) -> tuple[str, ...]:
    """`parts` with the low-noise expert after "dit" when the base has two experts."""
    if cfg.experts == 1 or "dit" not in parts:
        return tuple(parts)
    return tuple(p for part in parts for p in ((part, LOW_EXPERT) if part == "dit" else (part,)))


def part_config(cfg: ModelConfig, part: str):
    """The family config of one part; both experts share the DiT's."""
    return cfg.dit if part == LOW_EXPERT else getattr(cfg, part)


def pair_experts(models: BaseModels, low: nn.Module | None) -> None:
    """Put the two experts in `models.dit` as one ExpertPair (the DiT everything downstream takes)."""
    if low is not None:
        from model.experts import ExpertPair

        models.dit = ExpertPair(models.dit, low, models.cfg.boundary)


def part_ctor(part: str, family_cfg) -> Callable[[], nn.Module]:
    """Constructor of one part's module from its family config (DiTConfig, VAEConfig or T5Config).
    Model modules are imported lazily: a DiT-only checkpoint needs only model/dit.py."""
    if part in ("dit", LOW_EXPERT):
        from model.dit import DiT

        return lambda: DiT(family_cfg)
    if part == "vae":
        from model.vae import VAE

        return lambda: VAE(family_cfg)
    if part == "t5":
        from model.t5 import T5Encoder

        return lambda: T5Encoder(family_cfg)
    raise ValueError(f"unknown model part {part!r}; choose from {PARTS}")


def check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    if unknown := [p for p in parts if p not in PARTS]:
        raise ValueError(f"unknown model parts {unknown}; choose from {list(PARTS)}")
    if not parts:
        raise ValueError(f"no model parts given; choose from {list(PARTS)}")
    return tuple(dict.fromkeys(parts))


# ---------------------------------------------------------------------------------------------- save


def save_part(folder: str | Path, part: str, state: nn.Module | Mapping[str, torch.Tensor]) -> Path:
    """Write one part's safetensors file (atomically); returns its path."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    path = Path(folder) / FILES[part]
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "part": part}
    write_safetensors_atomic(path, sd, metadata)
    return path


def write_config(folder: str | Path, cfg: ModelConfig, parts: Sequence[str], *, dtype: torch.dtype | str,
                 tokenizer: bool = False, added_tokens: Sequence[str] = (),
                 source: Mapping | None = None) -> None:
    """config.json, written last: its presence says every listed part file is complete."""
    folder = Path(folder)
    if added_tokens:
        write_json_atomic(folder / ADDED_TOKENS_FILE, list(added_tokens))
    write_json_atomic(folder / "config.json", {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "parts": {p: FILES[p] for p in FILES if p in parts},
        "dtype": DTYPE_NAMES[parse_dtype(dtype)],
        "tokenizer": TOKENIZER_FILE if tokenizer else None,
        "added_tokens": ADDED_TOKENS_FILE if added_tokens else None,
        "source": dict(source or {}),
    })


def copy_tokenizer(folder: str | Path, tokenizer_path: str | Path) -> None:
    src = Path(tokenizer_path)
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file {src} does not exist (expected a sentencepiece .model file)")
    write_atomic(Path(folder) / TOKENIZER_FILE, lambda tmp: shutil.copyfile(src, tmp))


def save_checkpoint(folder: str | Path, cfg: ModelConfig, dit: nn.Module | None = None,
                    vae: nn.Module | None = None, t5: nn.Module | None = None,
                    tokenizer_path: str | Path | None = None, added_tokens: Sequence[str] = (),
                    source: Mapping | None = None) -> Path:
    """Save the given parts as a checkpoint folder loadable by `load_checkpoint` / `--base DIR`.

    A module's own `cfg` (e.g. a T5 whose token embedding grew) wins over `cfg` for its family, so
    the config always describes the saved tensors. Each file is atomic; config.json comes last.
    """
    folder = Path(folder)
    models = {"dit": dit, "vae": vae, "t5": t5}
    if hasattr(dit, "boundary"):  # an ExpertPair: one file per expert
        models.update(dit=dit.high, dit_low=dit.low)
        cfg = dataclasses.replace(cfg, boundary=dit.boundary)
    for part, module in models.items():
        own = getattr(module, "cfg", None)
        if own is not None and part != LOW_EXPERT and own != getattr(cfg, part):
            cfg = dataclasses.replace(cfg, **{part: own})
    parts = [p for p, m in models.items() if m is not None]
    if not parts:
        raise ValueError("save_checkpoint needs at least one of dit, vae, t5")
    dtypes = {t.dtype for p in parts for t in models[p].state_dict().values() if t.is_floating_point()}
    folder.mkdir(parents=True, exist_ok=True)
    for part in parts:
        save_part(folder, part, models[part])
    if tokenizer_path is not None:
        copy_tokenizer(folder, tokenizer_path)
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    write_config(folder, cfg, parts, dtype=dtype, tokenizer=tokenizer_path is not None,
                 added_tokens=added_tokens, source=source)
    return folder


# ---------------------------------------------------------------------------------------------- load


def read_checkpoint_config(folder: str | Path) -> dict:
    """The parsed config.json of a checkpoint folder, after checking format and version."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise ValueError(f"{folder} is not a setseq checkpoint folder: it has no config.json. "
                         f"{_conversion_hint(folder)}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid json ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a setseq checkpoint folder: {path} has no "
                         f"\"format\": \"{FORMAT}\". "
                         f"{_conversion_hint(folder)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')}; this setseq reads "
                         f"version {FORMAT_VERSION}")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("parts"), dict):
        raise ValueError(f"{path} lacks its \"model\" config or \"parts\" table; the folder is damaged, "
                         "convert or save it again")
    return meta


def _conversion_hint(folder: Path) -> str:
    if (folder / "model_index.json").is_file() or (folder / "transformer").is_dir():
        return f"It looks like a diffusers folder: run `setseq convert --from diffusers {folder} --out DIR`."
    if any(folder.glob("diffusion_pytorch_model*.safetensors")) or (folder / "Wan2.1_VAE.pth").is_file():
        return f"It looks like a Wan 2.1 release: run `setseq convert --from wan {folder} --out DIR`."
    return "Make one with `setseq convert --from {wan,diffusers} SRC --out DIR`, or pass a preset name."


def is_checkpoint(folder: str | Path) -> bool:
    try:
        read_checkpoint_config(folder)
    except (ValueError, FileNotFoundError):
        return False
    return True


def checkpoint_config(folder: str | Path) -> ModelConfig:
    meta = read_checkpoint_config(folder)
    try:
        return ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{Path(folder) / 'config.json'} holds an invalid model config: {err}") from None


def load_checkpoint(folder: str | Path, dtype: torch.dtype | str = torch.float32,
                    device: torch.device | str = "cpu", parts: Sequence[str] = PARTS) -> BaseModels:
    """Load the parts asked for, strictly, in `dtype` on `device`. A part the folder lacks is an error.
    On the meta device only the files' layouts are read: the modules a load would give, without data."""
    folder = Path(folder)
    meta = read_checkpoint_config(folder)
    cfg = checkpoint_config(folder)
    parts = check_parts(parts)
    models = BaseModels(cfg=cfg, source=str(folder))
    low = None
    for part in expert_parts(cfg, parts):
        name = meta["parts"].get(part)
        if name is None:
            raise ValueError(f"{folder} has no {part} weights (it holds {sorted(meta['parts'])}); "
                             f"load parts={sorted(meta['parts'])} or convert with --parts including {part}")
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder / 'config.json'} lists it as the "
                                    f"{part} weights")
        sd = read_safetensors_meta(path) if torch.device(device).type == "meta" else read_safetensors(path)
        module = load_into(part_ctor(part, part_config(cfg, part)), sd, dtype, device, source=str(path))
        if part == LOW_EXPERT:
            low = module
        else:
            setattr(models, part, module)
    pair_experts(models, low)
    if meta.get("tokenizer"):
        models.tokenizer_path = folder / meta["tokenizer"]
    if meta.get("added_tokens"):
        models.added_tokens = json.loads((folder / meta["added_tokens"]).read_text())
    return models


def random_models(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu", parts: Sequence[str] = PARTS) -> BaseModels:
    """Randomly initialized parts from a fixed seed (part i uses seed + i, so each is reproducible alone)."""
    models = BaseModels(cfg=cfg, source=f"preset {cfg.name} (random init, seed {seed})")
    low = None
    for part in expert_parts(cfg, check_parts(parts)):
        part_seed = seed + list(FILES).index(part)
        ctor = part_ctor(part, part_config(cfg, part))
        module = random_init(ctor, part_seed, dtype, device, source=models.source)
        if part == LOW_EXPERT:
            low = module
        else:
            setattr(models, part, module)
    pair_experts(models, low)
    return models


# ---------------------------------------------------------------------------------------------- info


def describe_checkpoint(folder: str | Path) -> list[str]:
    """Lines for `setseq info DIR`: model, format, dtype, source, and per part its file, tensor and
    parameter counts and size, read from the safetensors headers (no tensor data is loaded)."""
    folder = Path(folder)
    meta = read_checkpoint_config(folder)
    cfg = checkpoint_config(folder)
    src = meta.get("source") or {}
    lines = [
        f"checkpoint {folder}",
        f"  model: {cfg.name}  (format {FORMAT} v{meta['format_version']}, dtype {meta.get('dtype')})",
        f"  source: {src.get('layout', '')} {src.get('path', '')}".rstrip() if src else "  source: -",
        f"  dit: dim {cfg.dit.dim}, {cfg.dit.layers} layers, {cfg.dit.heads} heads, "
        f"text_dim {cfg.dit.text_dim}",
        f"  vae: {cfg.vae.latent_channels} latent channels, compression {cfg.vae.time_compression}x"
        f"{cfg.vae.space_compression}x{cfg.vae.space_compression}",
        f"  t5: dim {cfg.t5.dim}, {cfg.t5.layers} layers, vocab {cfg.t5.vocab_size}",
        f"  sampling: shift {cfg.sample_shift}, guidance {cfg.guidance}, {cfg.sample_steps} steps",
    ]
    if cfg.experts == 2:
        low_g = cfg.guidance if cfg.low_noise_guidance is None else cfg.low_noise_guidance
        lines.append(f"  experts: 2 DiTs of the config above: high-noise (dit) for t >= {cfg.boundary} at "
                     f"guidance {cfg.guidance}, low-noise ({LOW_EXPERT}) below at guidance {low_g}")
    for part in expert_parts(cfg, PARTS):
        name = meta["parts"].get(part)
        if name is None:
            lines.append(f"  [{part}] not included")
            continue
        path = folder / name
        if not path.is_file():
            lines.append(f"  [{part}] {name}: MISSING")
            continue
        entries, _ = read_safetensors_header(path)
        params = sum(_numel(shape) for _, shape in entries.values())
        lines.append(f"  [{part}] {name}: {len(entries)} tensors, {params / 1e6:.2f}M parameters, "
                     f"{path.stat().st_size / 2**20:.1f} MiB")
    tok = meta.get("tokenizer")
    added = json.loads((folder / meta["added_tokens"]).read_text()) if meta.get("added_tokens") else []
    lines.append(f"  tokenizer: {tok or 'none (pass one to commands that need text)'}"
                 + (f", added tokens {added}" if added else ""))
    return lines


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["FORMAT", "FORMAT_VERSION", "PARTS", "PART_FILES", "BaseModels", "save_checkpoint", "save_part",
           "write_config", "copy_tokenizer", "load_checkpoint", "read_checkpoint_config", "checkpoint_config",
           "is_checkpoint", "random_models", "describe_checkpoint", "part_ctor",
           "check_parts", "expert_parts", "part_config", "LOW_EXPERT"]
