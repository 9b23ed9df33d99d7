"""Wan 2.1 DiT weights -> our `model.dit.DiT`: explicit anchored key maps, strict conversion.

Two source layouts:
- "wan": the original Wan 2.1 release (`WanModel`, e.g. diffusion_pytorch_model*.safetensors in
  Wan-AI/Wan2.1-T2V-*). Our module names mirror it, so the map is the identity. Repackaged files that
  prefix every key with `model.diffusion_model.` or `diffusion_model.` are accepted.
- "diffusers": `WanTransformer3DModel`. Note the swapped norm names: diffusers' `norm2` is the affine
  cross-attention norm, i.e. Wan's (and our) `norm3`.

Each map is built key by key from the config (no substring replacement); conversion then checks the
result against a meta-device DiT: every key present, none left over, every shape equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from model.config import DiTConfig
from model.dit import DiT

from .load import build_meta, check_state_dict, expected_shapes

SOURCES = ("wan", "diffusers")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (diffusers name, our name) for the modules outside the blocks; each gets .weight/.bias unless noted.
_TOP = [
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("proj_out", "head.head"),
]
# Inside blocks.{i}: (diffusers, ours) Linear-like modules with .weight and .bias.
_QKVO = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
_BLOCK_LINEARS = [
    *[(f"attn1.{d}", f"self_attn.{o}") for d, o in _QKVO],
    *[(f"attn2.{d}", f"cross_attn.{o}") for d, o in _QKVO],
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
]
# Inside blocks.{i}: (diffusers, ours) weight-only tensors.
_BLOCK_WEIGHTS = [
    ("attn1.norm_q.weight", "self_attn.norm_q.weight"),
    ("attn1.norm_k.weight", "self_attn.norm_k.weight"),
    ("attn2.norm_q.weight", "cross_attn.norm_q.weight"),
    ("attn2.norm_k.weight", "cross_attn.norm_k.weight"),
    ("scale_shift_table", "modulation"),
]


def _check_wan_shaped(cfg: DiTConfig) -> None:
    """The Wan 2.1 layouts hold exactly Wan's modules; refuse configs that have others or lack some."""
    wan_like = dict(modulation="shared", text_proj=True, qk_norm="rms_across_heads", cross_attn_norm=True,
                    self_cond=False, abs_pos=None)
    bad = {k: getattr(cfg, k) for k, v in wan_like.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"a Wan 2.1 checkpoint needs DiTConfig fields {wan_like}; this config has {bad}. "
                         "Use the wan2.1-* presets or dit_config_from_diffusers()")


def _diffusers_pairs(cfg: DiTConfig) -> list[tuple[str, str]]:
    pairs = [(f"{d}.{p}", f"{o}.{p}") for d, o in _TOP for p in ("weight", "bias")]
    pairs.append(("scale_shift_table", "head.modulation"))
    for i in range(cfg.layers):
        pairs += [(f"blocks.{i}.{d}.{p}", f"blocks.{i}.{o}.{p}")
                  for d, o in _BLOCK_LINEARS for p in ("weight", "bias")]
        pairs += [(f"blocks.{i}.{d}", f"blocks.{i}.{o}") for d, o in _BLOCK_WEIGHTS]
        pairs += [(f"blocks.{i}.norm2.{p}", f"blocks.{i}.norm3.{p}") for p in ("weight", "bias")]
    return pairs


def wan_dit_keymap(cfg: DiTConfig, source: str = "wan") -> dict[str, str]:
    """{their key: our key} for a Wan 2.1 DiT of this config in the given source layout."""
    if source not in SOURCES:
        raise ValueError(f"unknown Wan DiT source layout {source!r}; choose one of {SOURCES}")
    _check_wan_shaped(cfg)
    pairs = _diffusers_pairs(cfg)
    if source == "wan":  # our names are Wan's names
        return {ours: ours for _, ours in pairs}
    return dict(pairs)


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def convert_wan_dit(state_dict: Mapping[str, torch.Tensor], source: str,
                    cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename a Wan 2.1 DiT state dict (original or diffusers layout) to ours; strict: raises ValueError
    listing missing/unexpected keys and any shape mismatch (key, expected vs got shape)."""
    keymap = wan_dit_keymap(cfg, source)
    state_dict = _strip_prefix(state_dict) if source == "wan" else state_dict
    missing = sorted(k for k in keymap if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in keymap)
    if missing or unexpected:
        raise ValueError(f"Wan DiT ({source} layout) does not match the config: {len(missing)} missing keys "
                         f"{missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}; check the "
                         "config (layers, dims) and the source layout")
    ours = {keymap[k]: v for k, v in state_dict.items()}
    check_state_dict(expected_shapes(build_meta(lambda: DiT(cfg))), ours, source=f"Wan DiT ({source} layout)")
    return ours


def export_wan_dit(state_dict: Mapping[str, torch.Tensor], source: str,
                   cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Inverse of convert_wan_dit: our state dict -> the given source layout."""
    inverse = {o: t for t, o in wan_dit_keymap(cfg, source).items()}
    extra, missing = sorted(set(state_dict) - set(inverse)), sorted(set(inverse) - set(state_dict))
    if extra or missing:
        raise ValueError(f"cannot export to the {source} layout: {len(extra)} keys with no Wan name "
                         f"{extra[:6]}, {len(missing)} Wan keys without a tensor {missing[:6]}")
    return {inverse[k]: v for k, v in state_dict.items()}


def dit_config_from_diffusers(config: Mapping) -> DiTConfig:
    """A diffusers WanTransformer3DModel config.json (as a dict) -> DiTConfig (text-to-video only)."""
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if config.get(key) is not None:
            raise ValueError(f"diffusers Wan config sets {key}={config[key]} (image conditioning); only the "
                             "text-to-video model is supported")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"diffusers Wan qk_norm {config['qk_norm']!r} is not supported; expected "
                         "'rms_norm_across_heads'")
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 16)
    return DiTConfig(
        in_channels=in_channels, out_channels=config.get("out_channels") or in_channels,
        patch=tuple(config.get("patch_size", (1, 2, 2))), dim=heads * head_dim, heads=heads,
        layers=config.get("num_layers", 40), ffn_dim=config.get("ffn_dim", 13824),
        text_dim=config.get("text_dim", 4096), text_proj=True, freq_dim=config.get("freq_dim", 256),
        time_scale=1000.0, modulation="shared", qk_norm="rms_across_heads",
        cross_attn_norm=bool(config.get("cross_attn_norm", True)), eps=config.get("eps", 1e-6),
        rope_split=None, window=None, self_cond=False, abs_pos=None,
    )


def dit_config_from_wan(config: Mapping) -> DiTConfig:
    """An original Wan config.json (WanModel: dim, num_heads, ...) -> DiTConfig (t2v, and Wan 2.2's ti2v)."""
    if config.get("model_type", "t2v") not in ("t2v", "ti2v"):  # ti2v: Wan 2.2 TI2V-5B (text+image to video)
        raise ValueError(f"Wan model_type {config['model_type']!r} is not supported; only 't2v' and 'ti2v'")
    return DiTConfig(
        in_channels=config.get("in_dim", 16), out_channels=config.get("out_dim", 16),
        patch=tuple(config.get("patch_size", (1, 2, 2))), dim=config["dim"], heads=config["num_heads"],
        layers=config["num_layers"], ffn_dim=config["ffn_dim"], text_dim=config.get("text_dim", 4096),
        text_proj=True, freq_dim=config.get("freq_dim", 256), modulation="shared", qk_norm="rms_across_heads",
        cross_attn_norm=bool(config.get("cross_attn_norm", True)), eps=config.get("eps", 1e-6),
    )


# Where each size lives in the tensors: (wan key, diffusers key, dim of the shape, our field).
_SIZES = (
    ("patch_embedding.weight", "patch_embedding.weight", 0, "dim"),
    ("patch_embedding.weight", "patch_embedding.weight", 1, "in_channels"),
    ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight", 1, "text_dim"),
    ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight", 1, "freq_dim"),
    ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight", 0, "ffn_dim"),
)
# The config.json key of each of those sizes, per layout (diffusers gives the width as heads x head dim).
JSON_KEYS = {
    "wan": {"dim": "dim", "in_channels": "in_dim", "out_channels": "out_dim", "text_dim": "text_dim",
            "freq_dim": "freq_dim", "ffn_dim": "ffn_dim", "layers": "num_layers"},
    "diffusers": {"in_channels": "in_channels", "out_channels": "out_channels", "text_dim": "text_dim",
                  "freq_dim": "freq_dim", "ffn_dim": "ffn_dim", "layers": "num_layers"},
}


def dit_sizes(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, int]:
    """The sizes a Wan DiT state dict holds: width, in/out channels, text and time embedding widths, MLP
    width, layer count (DiTConfig field -> value), read from the tensors, not from any config."""
    sd = _strip_prefix(state_dict) if source == "wan" else state_dict
    wan = source == "wan"
    try:
        sizes = {field: sd[k if wan else d].shape[i] for k, d, i, field in _SIZES}
        patch = tuple(sd["patch_embedding.weight"].shape[2:])
        head = sd["head.head.weight" if wan else "proj_out.weight"]
        sizes["out_channels"] = head.shape[0] // math.prod(patch)
    except KeyError as err:
        raise ValueError(f"a Wan DiT in the {source} layout lacks the tensor {err.args[0]!r}") from None
    blocks = [k.split(".")[1] for k in sd if k.startswith("blocks.")]
    sizes["layers"] = 1 + max(int(b) for b in blocks if b.isdigit())
    return sizes


__all__ = ["SOURCES", "dit_sizes", "JSON_KEYS", "wan_dit_keymap", "convert_wan_dit", "export_wan_dit",
           "dit_config_from_diffusers", "dit_config_from_wan"]
