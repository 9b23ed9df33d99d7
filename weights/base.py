"""The one base loader: `--base NAME_OR_FOLDER` -> a `model.base.Base` bundle.

    folder              a checkpoint folder (`setseq convert`, `setseq pretrain`): its weights
    preset with weights a preset whose weights ship with the repository (tiny -> assets/tiny)
    any preset + random_weights   randomly initialized from a seed (tests, timing, smoke runs)

A preset with neither is refused by `base_config`, which reads no weights: a command calls it first,
so `--base wan2.1-1.3b` says what to pass before anything is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.base import Base
from model.config import PRESETS, ModelConfig
from model.experts import ExpertPair
from model.fp8 import check_fp8_available, quantize_linears
from model.offload import BlockOffload
from model.tokenizer import base_tokenizer

from .checkpoint import BaseModels, checkpoint_config, load_checkpoint, random_models
from .load import parse_dtype

REPO = Path(__file__).resolve().parents[1]
# Presets whose trained weights are committed: the name loads them unless random weights are asked for.
COMMITTED = {"tiny": REPO / "assets" / "tiny", "tiny-conv": REPO / "assets" / "tiny-conv"}


def base_source(base: str | Path, random_weights: bool = False) -> Path | None:
    """The checkpoint folder `base` names, or None for random weights; a ValueError when neither fits."""
    name = str(base)
    if name in PRESETS:
        if random_weights:
            return None
        if name in COMMITTED and COMMITTED[name].is_dir():
            return COMMITTED[name]
        raise ValueError(f"base {name!r} is a preset without committed weights: convert a checkpoint "
                         f"(`setseq convert --from wan SRC --out DIR`, then --base DIR), or pass "
                         "--random-weights for randomly initialized weights")
    path = Path(base)
    if random_weights:
        raise ValueError(f"--random-weights takes a preset name ({', '.join(sorted(PRESETS))}), not {name!r}")
    if path.is_dir():
        return path
    if path.exists() or path.suffix or "/" in name:
        raise FileNotFoundError(f"base {name!r} is not a checkpoint folder; pass a folder written by "
                                f"`setseq convert` or a preset name ({', '.join(sorted(PRESETS))})")
    raise ValueError(f"unknown base {name!r}: not a preset ({', '.join(sorted(PRESETS))}) and no such folder")


def base_config(base: str | Path, random_weights: bool = False) -> ModelConfig:
    """The base's config, read without loading any weights (and every refusal of `base_source`)."""
    folder = base_source(base, random_weights)
    return PRESETS[str(base)] if folder is None else checkpoint_config(folder)


def pick_device(device: str | None) -> torch.device:
    """`device` (default CUDA when available), refused unless this machine has it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda (cuda:N for one GPU of several)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine's PyTorch ({torch.__version__}) sees "
                         f"{torch.cuda.device_count()} CUDA GPUs; use --device cpu or another GPU")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, dev: torch.device) -> torch.dtype:
    """`dtype` (default bf16 on CUDA, else fp32); bf16 on the CPU is refused: only CUDA runs our sampling and
    training under bf16 autocast, so on the CPU fp32 activations would meet bf16 weights."""
    dt = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    if dev.type == "cpu" and dt != torch.float32:
        raise ValueError(f"--dtype {dtype}: the CPU runs fp32 only (bf16 weights need CUDA's autocast); "
                         "drop --dtype or pass --dtype fp32")
    return dt


def check_memory_options(cfg: ModelConfig, base_dtype: str | None, offload_blocks: int, *,
                         compile: bool = False, data_parallel: bool = False,
                         offload_idle_expert: bool = False) -> None:
    """--base-dtype, --offload-blocks and --offload-idle-expert (beside --compile, and under torchrun),
    refused before anything is allocated."""
    if offload_idle_expert and cfg.boundary is None:
        raise ValueError(f"--offload-idle-expert: base {cfg.name!r} has one DiT (no second expert to "
                         "offload); drop the flag (it is for two-expert bases such as wan2.2-t2v-a14b)")
    if offload_idle_expert and offload_blocks:
        raise ValueError("--offload-idle-expert with --offload-blocks: block offload already streams each "
                         "expert's blocks from the host and the two cannot share them; drop one of the flags")
    if offload_blocks and compile:
        raise ValueError("--compile with --offload-blocks: offload streams blocks from hooks that a compiled "
                         "block would trace; drop one of them")
    if offload_blocks and data_parallel:
        raise ValueError("--offload-blocks under torchrun: FSDP2 already keeps 1/N of the DiT per GPU and "
                         "gathers each block before it runs; drop --offload-blocks (or run one process)")
    if base_dtype not in (None, "fp8"):
        raise ValueError(f"--base-dtype {base_dtype!r}: expected fp8 (or leave it out for --dtype's weights)")
    if base_dtype == "fp8":
        check_fp8_available()
    layers = cfg.dit.layers
    whole = isinstance(offload_blocks, int) and not isinstance(offload_blocks, bool)
    if not (whole and 0 <= offload_blocks < layers):
        raise ValueError(f"--offload-blocks {offload_blocks}: base {cfg.name!r} has {layers} DiT blocks and "
                         f"the first stays on the device; choose 0..{layers - 1}")


def load_base(base: str | Path, *, device: str | None = None, dtype: str | torch.dtype | None = None,
              tokenizer: str | Path | None = None, random_weights: bool = False, seed: int = 0,
              base_dtype: str | None = None, offload_blocks: int = 0, offload_idle_expert: bool = False,
              dit_on_host: bool = False, dit_on_meta: bool = False) -> Base:
    """Load the base model `base` names (see the module doc) in `dtype` (default bf16 on CUDA, else fp32)
    on `device` (default CUDA when available). `tokenizer` overrides the checkpoint's sentencepiece model;
    `seed` fixes random weights. `base_dtype="fp8"` stores the DiT's block linears in fp8 (model/fp8.py;
    a checkpoint converted with `--dtype fp8` already is); `offload_blocks=K` keeps the last K DiT blocks in
    host memory, streamed to the device as they are used (model/offload.py); `offload_idle_expert` puts only
    a two-expert DiT's high-noise expert on the device, the other waiting on the CPU for sampling's switch
    (ExpertPair.offload_idle). With any, the DiT is loaded on the CPU first, so the device never holds its
    full-precision or whole self. `dit_on_host` leaves the DiT on the CPU (torchrun: FSDP2's `fully_shard`
    moves each rank's shard to the device); `dit_on_meta` builds it on the meta device, the structure a
    load would give without reading a weight (torchrun's ranks but the first, whose shards are filled
    from the first's host copy: train/distributed.py `shard`)."""
    folder = base_source(base, random_weights)
    check_memory_options(PRESETS[str(base)] if folder is None else checkpoint_config(folder), base_dtype,
                         offload_blocks, offload_idle_expert=offload_idle_expert)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if dit_on_meta and (offload_blocks or offload_idle_expert):
        raise ValueError("a DiT on the meta device (torchrun) cannot be offloaded; drop --offload-blocks and "
                         "--offload-idle-expert")
    staged = base_dtype == "fp8" or offload_blocks > 0 or offload_idle_expert or dit_on_host
    dit_dev = torch.device("meta") if dit_on_meta else torch.device("cpu") if staged else dev
    if folder is None:
        models = random_models(PRESETS[str(base)], seed, dt, dev, parts=("vae", "t5"))
        models.dit = random_models(PRESETS[str(base)], seed, dt, dit_dev, parts=("dit",)).dit
    else:
        models = load_checkpoint(folder, dtype=dt, device=dev, parts=("vae", "t5"))
        models.dit = load_checkpoint(folder, dtype=dt, device=dit_dev, parts=("dit",)).dit
    if base_dtype == "fp8":
        quantize_linears(models.dit)
    experts = (models.dit.high, models.dit.low) if isinstance(models.dit, ExpertPair) else (models.dit,)
    for dit in experts if offload_blocks else ():  # each kept alive by its hooks on the DiT
        BlockOffload(dit, dit.blocks, offload_blocks, dev)
    if offload_idle_expert:
        models.dit.offload_idle(dev)
    elif not (dit_on_host or dit_on_meta):
        models.dit.to(dev)
    return _bundle(models, tokenizer or models.tokenizer_path, str(base))


def _bundle(models: BaseModels, sp_path: str | Path | None, base: str) -> Base:
    if sp_path is None:
        raise ValueError(f"base {base!r} ships no tokenizer; pass --tokenizer path/to/spiece.model")
    rows = models.t5.token_embedding.weight.shape[0]
    tok = base_tokenizer(sp_path, models.added_tokens, rows)
    # The concept records the base by its model name (e.g. "wan2.1-1.3b") and architecture fingerprint.
    return Base(models.cfg, models.dit, models.vae, models.t5, tok, name=models.cfg.name)


__all__ = ["COMMITTED", "base_source", "base_config", "pick_device", "pick_dtype", "check_memory_options",
           "load_base"]
