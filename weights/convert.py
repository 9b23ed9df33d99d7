"""Convert a public Wan 2.1 release (original layout or diffusers layout) into our checkpoint folder.

Source layouts (local files only; nothing is downloaded):

    original Wan 2.1 (Wan-AI/Wan2.1-T2V-1.3B, -14B):
      SRC/config.json + SRC/diffusion_pytorch_model.safetensors   DiT (14B: 6 shards + index json)
      SRC/Wan2.1_VAE.pth                                          VAE
      SRC/models_t5_umt5-xxl-enc-bf16.pth                         umT5-XXL encoder
      SRC/google/umt5-xxl/spiece.model                            tokenizer
    diffusers (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B-Diffusers):
      SRC/model_index.json
      SRC/transformer/config.json + diffusion_pytorch_model.safetensors (or shards + index json)
      SRC/vae/config.json + diffusion_pytorch_model.safetensors
      SRC/text_encoder/config.json + model.safetensors (or shards + index json)
      SRC/tokenizer/spiece.model
    Wan 2.2 T2V-A14B, two experts of the Wan 2.1 14B shape (the VAE, umT5 and tokenizer as above):
      original: SRC/high_noise_model/ and SRC/low_noise_model/, each config.json + its DiT weights
      diffusers: SRC/transformer/ (high-noise expert) and SRC/transformer_2/ (low-noise expert);
                 model_index.json's boundary_ratio gives the boundary when present

Each part is read, sniffed (is this the model we expect, in the layout we were told?), mapped to our
names by the family's key map (weights/wan_dit.py, wan_vae.py, t5.py), checked key by key and shape by
shape against our module built on the meta device, cast and written. The output folder appears only
when every part has passed: a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import PRESETS, DiTConfig, ModelConfig, T5Config
from model.fp8 import check_fp8_available, fp8_target_names, quantize_state_dict
from model.tempfiles import kill_point, remove_stale, temp_path

from .checkpoint import LOW_EXPERT, PARTS, check_parts, copy_tokenizer, part_ctor, save_part, write_config
from .io import INDEX_SUFFIX, find_weights_file, preview, read_state_dict
from .load import build_meta, check_state_dict, expected_shapes, parse_dtype
from .sizes import checked_dit_config, checked_vae_config, fit_parts

LAYOUTS = ("wan", "diffusers")
WAN_PRESETS = ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-ti2v-5b")
A14B = "wan2.2-t2v-a14b"  # the two-expert preset: its boundary and per-stage guidance go to converted pairs
# Each expert's folder, (high-noise, low-noise), per layout: the dit part and the LOW_EXPERT part.
EXPERT_DIRS = {"wan": ("high_noise_model", "low_noise_model"), "diffusers": ("transformer", "transformer_2")}
WAN_FILES = {"dit": "diffusion_pytorch_model", "vae": "Wan2.1_VAE.pth",
             "t5": "models_t5_umt5-xxl-enc-bf16.pth"}
WAN22_VAE = "Wan2.2_VAE.pth"  # the TI2V-5B release's VAE file (in place of Wan2.1_VAE.pth)
WAN_TOKENIZER = "google/umt5-xxl/spiece.model"
DIFFUSERS_DIRS = {"dit": ("transformer", "diffusion_pytorch_model"),
                  "vae": ("vae", "diffusion_pytorch_model"),
                  "t5": ("text_encoder", "model")}
DIFFUSERS_TOKENIZER = "tokenizer/spiece.model"

# Keys that any checkpoint of a part in a layout must hold: a cheap, clear "is this even the right model".
SIGNATURES = {
    ("dit", "wan"): ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight"),
    ("dit", "diffusers"): ("patch_embedding.weight", "blocks.0.attn1.to_q.weight", "proj_out.weight"),
    ("vae", "wan"): ("encoder.conv1.weight", "conv1.weight", "decoder.conv1.weight"),
    ("vae", "diffusers"): ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_in.weight"),
    ("t5", "wan"): ("token_embedding.weight", "blocks.0.attn.q.weight"),
    ("t5", "diffusers"): ("encoder.block.0.layer.0.SelfAttention.q.weight",),
}
# Repackaged single-file DiTs (ComfyUI and others) prefix every key; the DiT key map accepts these too.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
PART_NAMES = {"dit": "Wan DiT", "vae": "Wan VAE", "t5": "umT5 text encoder",
              LOW_EXPERT: "Wan 2.2 low-noise expert DiT"}


def family(part: str) -> str:
    """The model family a part belongs to: the low-noise expert is a DiT."""
    return "dit" if part == LOW_EXPERT else part


@dataclass
class SourcePart:
    part: str
    weights: Path  # a file (.safetensors, .pth, or a shard index json)
    config: Path | None  # the part's config.json when the layout ships one


@dataclass
class Conversion:
    """What `convert` did, for the command to print."""

    cfg: ModelConfig
    out: Path
    parts: tuple[str, ...]
    notes: list[str]


# ------------------------------------------------------------------------------------- locate files


def locate(src: Path, layout: str, parts: Sequence[str]) -> dict[str, SourcePart]:
    """The file of every requested part, or a ValueError naming what is missing where."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown source layout {layout!r}; choose one of {LAYOUTS}")
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    found = {}
    for part in parts:
        if part == "dit" and has_experts(src, layout):
            found.update(_locate_experts(src, layout))
        else:
            found[part] = _locate_wan(src, part) if layout == "wan" else _locate_diffusers(src, part)
    return found


def has_experts(src: Path, layout: str) -> bool:
    """A Wan 2.2 A14B release: either expert's folder, or a model_index.json that names a boundary."""
    high, low = EXPERT_DIRS[layout]
    if layout == "wan":
        return (src / high).is_dir() or (src / low).is_dir()
    index = src / "model_index.json"
    return (src / low).is_dir() or (index.is_file() and read_json(index).get("boundary_ratio") is not None)


def _locate_experts(src: Path, layout: str) -> dict[str, SourcePart]:
    """Both experts' weights and config.json, or an error naming the folder that is missing or incomplete."""
    found = {}
    for part, sub in zip(("dit", LOW_EXPERT), EXPERT_DIRS[layout], strict=True):
        folder = src / sub
        role = "high-noise" if part == "dit" else "low-noise"
        if not folder.is_dir():
            high, low = EXPERT_DIRS[layout]
            raise ValueError(f"{src} is a two-expert Wan 2.2 release but has no {sub}/ folder for the {role} "
                             f"expert; expected both {high}/ and {low}/, each a config.json and "
                             "diffusion_pytorch_model.safetensors (or its shard index and shards)")
        weights = _weights_in(folder, WAN_FILES["dit"])
        if weights is None:
            raise ValueError(f"{folder} holds no weights for the {role} expert: expected "
                             f"{WAN_FILES['dit']}.safetensors or {WAN_FILES['dit']}{INDEX_SUFFIX} with its "
                             "shards")
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"{folder} has no config.json for the {role} expert; each expert folder needs "
                             "one")
        found[part] = SourcePart(part, weights, config)
    return found


def _weights_in(folder: Path, stem: str) -> Path | None:
    """`stem`.safetensors.index.json, else `stem`.safetensors, else the folder's only weights file."""
    for name in (stem + INDEX_SUFFIX, stem + ".safetensors"):
        if (folder / name).is_file():
            return folder / name
    try:
        return find_weights_file(folder) if folder.is_dir() else None
    except ValueError:
        return None


def _locate_wan(src: Path, part: str) -> SourcePart:
    if part == "dit":
        weights = _weights_in(src, WAN_FILES["dit"]) if any(src.glob("diffusion_pytorch_model*")) else None
        if weights is None:
            hint = " (it has a transformer/ folder: use --from diffusers)" if (src / "transformer").is_dir() \
                else ""
            raise ValueError(f"{src} is not an original Wan 2.1 checkpoint folder: no "
                             f"{WAN_FILES['dit']}.safetensors or {WAN_FILES['dit']}{INDEX_SUFFIX} "
                             f"for the DiT{hint}")
        return SourcePart("dit", weights, src / "config.json" if (src / "config.json").is_file() else None)
    path = src / WAN_FILES[part]
    if part == "vae" and (src / WAN22_VAE).is_file() and (not path.is_file() or _wants_22(src)):
        path = src / WAN22_VAE
    if not path.is_file():
        raise ValueError(f"{src}: no {WAN_FILES[part]} for the {PART_NAMES[part]}; put the file there or "
                         f"leave {part} out of --parts")
    return SourcePart(part, path, None)


def _locate_diffusers(src: Path, part: str) -> SourcePart:
    sub, stem = DIFFUSERS_DIRS[part]
    folder = src / sub
    if not folder.is_dir():
        wan = any(src.glob("diffusion_pytorch_model*"))
        hint = " (it looks like the original Wan layout: use --from wan)" if wan else ""
        raise ValueError(f"{src} is not a diffusers checkpoint folder: no {sub}/ folder for the "
                         f"{PART_NAMES[part]}{hint}")
    weights = _weights_in(folder, stem)
    if weights is None:
        raise ValueError(f"{folder} holds no weights: expected {stem}.safetensors or {stem}{INDEX_SUFFIX} "
                         "with its shards")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} has no config.json; the diffusers layout needs one per model folder")
    return SourcePart(part, weights, config)


def _wants_22(src: Path) -> bool:
    """Both VAE files in one folder: the DiT's config.json (in_dim 48) picks Wan 2.2's."""
    config = src / "config.json"
    return config.is_file() and read_json(config).get("in_dim") == PRESETS["wan2.2-ti2v-5b"].dit.in_channels


def find_tokenizer(src: Path, layout: str) -> Path | None:
    path = src / (WAN_TOKENIZER if layout == "wan" else DIFFUSERS_TOKENIZER)
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------------ configs


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid json ({err})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} should hold a json object, found {type(d).__name__}")
    return d


def _unprefixed(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _block_count(sd: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit())


def wan_dit_config_from_shapes(sd: Mapping[str, torch.Tensor], path: Path) -> DiTConfig:
    """Without a config.json: sizes from the tensors, the head count from the preset of that width."""
    sd = _unprefixed(sd)
    try:
        dim = sd["patch_embedding.weight"].shape[0]
        preset = next((PRESETS[n].dit for n in WAN_PRESETS if PRESETS[n].dit.dim == dim), None)
        if preset is None:
            raise ValueError(f"{path}: DiT width {dim} matches no Wan 2.1 preset ({', '.join(WAN_PRESETS)}) "
                             "and no config.json beside it gives the head count; add Wan's config.json")
        return dataclasses.replace(preset, layers=_block_count(sd),
                                   ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                                   in_channels=sd["patch_embedding.weight"].shape[1],
                                   text_dim=sd["text_embedding.0.weight"].shape[1])
    except KeyError as err:
        raise ValueError(f"{path} lacks the Wan DiT tensor {err.args[0]!r}") from None


def wan_t5_config_from_shapes(sd: Mapping[str, torch.Tensor], path: Path) -> T5Config:
    """umT5 sizes from Wan's encoder file (it ships no config); the head count from the bias table."""
    per_layer = "blocks.0.pos_embedding.embedding.weight" in sd
    try:
        bias = sd[("blocks.0." if per_layer else "") + "pos_embedding.embedding.weight"]
        vocab, dim = sd["token_embedding.weight"].shape
        heads = bias.shape[1]
        return dataclasses.replace(
            PRESETS["wan2.1-1.3b"].t5, vocab_size=vocab, dim=dim, heads=heads,
            head_dim=sd["blocks.0.attn.q.weight"].shape[0] // heads, rel_buckets=bias.shape[0],
            ffn_dim=sd["blocks.0.ffn.fc1.weight"].shape[0], per_layer_position_bias=per_layer,
            layers=_block_count(sd), ffn="gated-gelu" if "blocks.0.ffn.gate.0.weight" in sd else "relu")
    except KeyError as err:
        raise ValueError(f"{path} lacks the umT5 tensor {err.args[0]!r}") from None


def family_config(part: str, layout: str, src: SourcePart | None, sd: Mapping[str, torch.Tensor] | None):
    """The config of one part: from its config.json or tensors when there are any, else the Wan preset's
    (Wan2.1_VAE.pth ships no config: every Wan 2.1 release uses the same VAE)."""
    part = family(part)
    if src is not None and src.config is not None:
        try:
            cfg = _config_from_json(part, layout, read_json(src.config))
        except KeyError as err:
            raise ValueError(f"{src.config} lacks the field {err.args[0]!r}; is it the {PART_NAMES[part]}'s "
                             "config.json?") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{src.config}: {err}") from None
        return cfg if sd is None else _checked(part, layout, cfg, sd, src)
    if part == "vae" and sd is not None:  # Wan's .pth ships no config: the tensors say which VAE
        return checked_vae_config(None, sd, layout, None, src.weights)
    if layout == "wan" and part == "dit" and sd is not None:
        return wan_dit_config_from_shapes(sd, src.weights)
    if layout == "wan" and part == "t5" and sd is not None:
        return wan_t5_config_from_shapes(sd, src.weights)
    return getattr(PRESETS["wan2.1-1.3b"], part)


def _checked(part: str, layout: str, cfg, sd: Mapping[str, torch.Tensor], src: SourcePart):
    """A config.json's config, with the sizes its tensors hold (and none it contradicts)."""
    if part == "dit":
        return checked_dit_config(cfg, sd, layout, read_json(src.config), src.config, src.weights)
    if part == "vae":
        return checked_vae_config(cfg, sd, layout, src.config, src.weights)
    return cfg


def _config_from_json(part: str, layout: str, d: dict):
    if layout == "wan":  # only the DiT has a config.json in the original layout
        from .wan_dit import dit_config_from_wan

        return dit_config_from_wan(d)
    if part == "dit":
        from .wan_dit import dit_config_from_diffusers

        return dit_config_from_diffusers(d)
    if part == "vae":
        from .wan_vae import vae_config_from_diffusers

        return vae_config_from_diffusers(d)
    from .t5 import t5_config_from_hf

    return t5_config_from_hf(d)


def model_config(configs: Mapping[str, object], notes: list[str],
                 boundary: float | None = None) -> ModelConfig:
    """Bundle the family configs, named after the Wan preset whose DiT they match (its sampling too). With a
    low-noise expert (configs[LOW_EXPERT]) the base has two experts: A14B's sampling, boundary `boundary` or
    A14B's."""
    configs = dict(configs)
    low = configs.pop(LOW_EXPERT, None)
    if low is not None:
        return _expert_config(configs, low, notes, boundary)
    match = next((n for n in WAN_PRESETS if PRESETS[n].dit == configs["dit"]), None)
    base = PRESETS[match or "wan2.1-1.3b"]
    if match:
        notes.append(f"the DiT matches preset {match}")
    else:
        d = configs["dit"]
        notes.append(f"the DiT (dim {d.dim}, {d.layers} layers, {d.heads} heads) matches no Wan preset; "
                     "saved as a custom config")
    try:
        return dataclasses.replace(base, name=match or "wan2.1-custom", **configs)
    except ValueError as err:
        raise ValueError(f"the source's parts do not fit together: {err}") from None


def _expert_config(configs: dict, low: DiTConfig, notes: list[str], boundary: float | None) -> ModelConfig:
    if low != configs["dit"]:
        raise ValueError(f"the two experts' DiT configs differ: high-noise {configs['dit']}, low-noise "
                         f"{low}; a Wan 2.2 A14B release has two experts of one shape")
    preset = PRESETS[A14B]
    match = preset.dit == configs["dit"]
    notes.append(f"two experts (high- and low-noise), boundary {boundary or preset.boundary}: "
                 + (f"the DiT matches preset {A14B}" if match else "a custom size with A14B's sampling"))
    try:
        return dataclasses.replace(preset, name=A14B if match else "wan2.2-custom", **configs,
                                   boundary=boundary or preset.boundary)
    except ValueError as err:
        raise ValueError(f"the source's parts do not fit together: {err}") from None


def source_boundary(src: Path, layout: str) -> float | None:
    """model_index.json's boundary_ratio (diffusers' WanPipeline), when the release states one."""
    index = src / "model_index.json"
    if layout != "diffusers" or not index.is_file():
        return None
    value = read_json(index).get("boundary_ratio")
    return None if value is None else float(value)


# ------------------------------------------------------------------------------------- state dicts


def _has(sd: Mapping[str, torch.Tensor], key: str) -> bool:
    return key in sd or any(p + key in sd for p in _PREFIXES)


def sniff(sd: Mapping[str, torch.Tensor], part: str, layout: str, path: Path) -> None:
    """Refuse early, with a useful message, a file that is not this part in this layout."""
    if all(_has(sd, k) for k in SIGNATURES[(part, layout)]):
        return
    hint = ""
    for (p, lay), keys in SIGNATURES.items():
        if (p, lay) != (part, layout) and all(_has(sd, k) for k in keys):
            hint = (f"; it looks like a {PART_NAMES[p]} in the {lay} layout"
                    + (f" (use --from {lay})" if p == part else ""))
            break
    lacking = next(k for k in SIGNATURES[(part, layout)] if not _has(sd, k))
    raise ValueError(f"{path} is not a {PART_NAMES[part]} checkpoint in the {layout} layout: it has no "
                     f"{lacking!r} ({len(sd)} keys, e.g. {preview(sd, 4)}){hint}")


def to_ours(part: str, layout: str, sd: Mapping[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The family's key map (pure function) from the source names to ours."""
    if part == "dit":
        from .wan_dit import convert_wan_dit

        return convert_wan_dit(sd, source=layout, cfg=cfg)
    if part == "vae":
        from .wan_vae import convert_wan_vae

        return convert_wan_vae(sd, source=layout, cfg=cfg)
    from .t5 import convert_t5

    return convert_t5(sd, source="hf" if layout == "diffusers" else "wan", cfg=cfg)


def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def fp8_dit_state(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """`--dtype fp8`: the block linears quantized from the source precision, every other tensor bf16."""
    names = fp8_target_names(build_meta(part_ctor("dit", cfg)))
    weights = {f"{n}.weight" for n in names}
    rest = cast({k: v for k, v in sd.items() if k not in weights}, torch.bfloat16)
    return quantize_state_dict({**rest, **{k: sd[k] for k in weights}}, names)


# ---------------------------------------------------------------------------------------- convert


def prepare_out(out: Path) -> Path:
    """A fresh hidden folder beside `out`; `out` itself must not exist yet (or be an empty folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)  # a killed conversion's folder
    tmp = temp_path(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def convert(src: str | Path, out: str | Path, layout: str, *, dtype: torch.dtype | str = torch.float32,
            parts: Sequence[str] = PARTS, tokenizer: str | Path | None = None,
            progress: Callable | None = None) -> Conversion:
    """Convert the `parts` of the `layout` release in `src` into a checkpoint folder at `out`.
    `progress(iterable, **tqdm_kwargs)` wraps the loop over parts (e.g. tqdm); None = silent."""
    fp8 = dtype == "fp8"  # the DiT's block linears in fp8 with tile scales (model/fp8.py), the rest bf16
    src, out, dtype = Path(src), Path(out), parse_dtype("bf16" if fp8 else dtype)
    if fp8:
        check_fp8_available()
    parts = check_parts(parts)
    files = locate(src, layout, parts)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(src, layout)
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"tokenizer file {tok} does not exist (expected a sentencepiece .model file)")
    notes: list[str] = []
    configs = {p: family_config(p, layout, _config_only(src, layout, p), None)
               for p in PARTS if p not in parts}
    if skipped := [p for p in PARTS if p not in parts]:
        notes.append(f"not converted: {', '.join(skipped)} (config from the source if present, else Wan 2.1)")
    tmp = prepare_out(out)
    try:
        for part in progress(list(files), desc="convert", unit="part") if progress else files:
            sd = read_state_dict(files[part].weights)
            sniff(sd, family(part), layout, files[part].weights)
            configs[part] = family_config(part, layout, files[part], sd)
            try:
                ours = to_ours(family(part), layout, sd, configs[part])
            except ValueError as err:  # the key maps do not know the file name: add it
                raise ValueError(f"{files[part].weights}: {err}") from None
            del sd
            expected = expected_shapes(build_meta(part_ctor(part, configs[part])))
            check_state_dict(expected, ours, source=f"{files[part].weights} (after mapping to setseq names)")
            fp8_dit = fp8 and family(part) == "dit"
            stored = fp8_dit_state(ours, configs[part]) if fp8_dit else cast(ours, dtype)
            save_part(tmp, part, stored)
            del stored
            kill_point("convert")
            del ours
        fit_parts(configs, files, notes)
        cfg = model_config(configs, notes, source_boundary(src, layout))
        if tok is not None:
            copy_tokenizer(tmp, tok)
        else:
            notes.append("no tokenizer file found; commands that read prompts will need one")
        source = {"layout": layout, "path": str(src.resolve())} | ({"dit_linears": "fp8"} if fp8 else {})
        write_config(tmp, cfg, tuple(files), dtype=dtype, tokenizer=tok is not None, source=source)
        if out.exists():
            out.rmdir()  # empty (checked above); renaming onto a folder is not portable
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(cfg=cfg, out=out, parts=parts, notes=notes)


def _config_only(src: Path, layout: str, part: str) -> SourcePart | None:
    """A part that is not converted still lends its config.json, so the parts fit together."""
    config = src / "config.json" if layout == "wan" else src / DIFFUSERS_DIRS[part][0] / "config.json"
    if layout == "wan" and not config.is_file():  # a Wan 2.2 A14B release: the high-noise expert's
        config = src / EXPERT_DIRS["wan"][0] / "config.json"
    if config.is_file() and (layout == "diffusers" or part == "dit"):
        return SourcePart(part, config.parent, config)
    return None


__all__ = ["convert", "Conversion", "locate", "sniff", "model_config", "has_experts", "EXPERT_DIRS",
           "wan_dit_config_from_shapes",
           "wan_t5_config_from_shapes", "LAYOUTS", "SIGNATURES"]
