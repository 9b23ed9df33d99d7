"""Key maps from public T5 / umT5 encoder checkpoints into `model.t5.T5Encoder`.

Sources:
- "hf": transformers' `T5EncoderModel` / `UMT5EncoderModel` state dicts (`shared.weight`,
  `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...). `encoder.embed_tokens.weight` is a tied
  duplicate of `shared.weight`: either may be present; when both are, they must be equal. A full
  encoder-decoder checkpoint converts with `ignore_prefixes=("decoder.", "lm_head.")`.
- "wan": Wan 2.1's original umT5-XXL encoder file (models_t5_umt5-xxl-enc-bf16.pth, module
  `wan.modules.t5.T5Encoder`). Our module names mirror it, so its map is the identity, kept explicit.

Everything here is pure: a state dict in, a state dict out, no file I/O (see weights/io.py).
"""

from __future__ import annotations

import torch

from model.config import T5Config
from model.t5 import T5Encoder

SOURCES = ("hf", "wan")
_HF_TIED = ("encoder.embed_tokens.weight", "shared.weight")  # (duplicate, kept)


def _hf_block(cfg: T5Config, i: int) -> dict[str, str]:
    src, ours = f"encoder.block.{i}.layer", f"blocks.{i}"
    keys = {f"{src}.0.SelfAttention.{p}.weight": f"{ours}.attn.{p}.weight" for p in "qkvo"}
    keys[f"{src}.0.layer_norm.weight"] = f"{ours}.norm1.weight"
    keys[f"{src}.1.layer_norm.weight"] = f"{ours}.norm2.weight"
    if cfg.ffn == "gated-gelu":  # wi_0 is the GELU branch, wi_1 the linear one
        keys[f"{src}.1.DenseReluDense.wi_0.weight"] = f"{ours}.ffn.gate.0.weight"
        keys[f"{src}.1.DenseReluDense.wi_1.weight"] = f"{ours}.ffn.fc1.weight"
    else:
        keys[f"{src}.1.DenseReluDense.wi.weight"] = f"{ours}.ffn.fc1.weight"
    keys[f"{src}.1.DenseReluDense.wo.weight"] = f"{ours}.ffn.fc2.weight"
    bias = f"{src}.0.SelfAttention.relative_attention_bias.weight"
    if cfg.per_layer_position_bias:  # umT5: every layer has a table
        keys[bias] = f"{ours}.pos_embedding.embedding.weight"
    elif i == 0:  # T5: only layer 0 has one, shared by all layers
        keys[bias] = "pos_embedding.embedding.weight"
    return keys


def _wan_block(cfg: T5Config, i: int) -> dict[str, str]:
    b = f"blocks.{i}"
    names = [f"{b}.attn.{p}.weight" for p in "qkvo"]
    names += [f"{b}.norm1.weight", f"{b}.norm2.weight", f"{b}.ffn.gate.0.weight", f"{b}.ffn.fc1.weight",
              f"{b}.ffn.fc2.weight"]
    if cfg.per_layer_position_bias:
        names.append(f"{b}.pos_embedding.embedding.weight")
    return {n: n for n in names}


def t5_keymap(cfg: T5Config, source: str) -> dict[str, str]:
    """Source checkpoint key -> our `T5Encoder` key, one entry per tensor of ours."""
    if source == "hf":
        keys = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
        for i in range(cfg.layers):
            keys.update(_hf_block(cfg, i))
        return keys
    if source == "wan":
        if cfg.ffn != "gated-gelu":
            raise ValueError(f"Wan's T5 checkpoints have a gated-GELU FFN; cfg.ffn is {cfg.ffn!r}")
        keys = {"token_embedding.weight": "token_embedding.weight", "norm.weight": "norm.weight"}
        if not cfg.per_layer_position_bias:  # Wan's shared_pos=True layout
            keys["pos_embedding.embedding.weight"] = "pos_embedding.embedding.weight"
        for i in range(cfg.layers):
            keys.update(_wan_block(cfg, i))
        return keys
    raise ValueError(f"unknown T5 checkpoint source {source!r}; choose one of {SOURCES}")


def _untie_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold transformers' tied `encoder.embed_tokens.weight` into `shared.weight`."""
    dup_key, kept_key = _HF_TIED
    if dup_key not in sd:
        return sd
    sd = dict(sd)
    dup = sd.pop(dup_key)
    if kept_key not in sd:
        sd[kept_key] = dup
        return sd
    kept = sd[kept_key]
    same = kept.shape == dup.shape and (kept.is_meta or dup.is_meta or torch.equal(kept, dup))
    if not same:
        raise ValueError(f"{dup_key} differs from {kept_key} (shapes {tuple(dup.shape)} vs "
                         f"{tuple(kept.shape)}); transformers ties them, so this is not a plain T5 encoder")
    return sd


def _expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = T5Encoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def convert_t5(
    state_dict: dict[str, torch.Tensor],
    source: str,
    cfg: T5Config,
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A source state dict -> ours (same tensors, renamed). Strict: raises ValueError listing missing and
    unexpected keys and shape mismatches. Keys starting with one of `ignore_prefixes` are dropped first."""
    keymap = t5_keymap(cfg, source)
    if isinstance(ignore_prefixes, str):
        ignore_prefixes = (ignore_prefixes,)
    sd = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore_prefixes))}
    if source == "hf":
        sd = _untie_hf(sd)
    shapes = _expected_shapes(cfg)
    missing = sorted(k for k in keymap if k not in sd)
    unexpected = sorted(k for k in sd if k not in keymap)
    mismatched = [f"{k} -> {keymap[k]}: expected {shapes[keymap[k]]}, got {tuple(sd[k].shape)}"
                  for k in sorted(keymap) if k in sd and tuple(sd[k].shape) != shapes[keymap[k]]]
    if missing or unexpected or mismatched:
        parts = [_listing(t, v) for t, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("shape mismatches", mismatched)) if v]
        hint = "check that the config matches the checkpoint (t5_config_from_hf for HF configs)"
        raise ValueError(f"cannot convert this {source!r} T5 checkpoint into {cfg}:\n  "
                         + "\n  ".join([*parts, hint]))
    return {keymap[k]: v for k, v in sd.items()}


def t5_config_from_hf(config: dict, *, max_length: int = 512) -> T5Config:
    """transformers' T5Config / UMT5Config as a dict (config.json) -> our T5Config."""
    model_type = config.get("model_type")
    if model_type not in ("t5", "umt5"):
        raise ValueError(f"config model_type {model_type!r} is not a T5 encoder; expected 't5' or 'umt5'")
    proj = config.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu", "relu"):
        raise ValueError(f"feed_forward_proj {proj!r} is not supported; setseq's T5 has 'gated-gelu' "
                         f"(T5 v1.1 / umT5, gelu_new) and 'relu' (original T5)")
    try:
        return T5Config(
            vocab_size=config["vocab_size"], dim=config["d_model"], head_dim=config["d_kv"],
            heads=config["num_heads"], ffn_dim=config["d_ff"], layers=config["num_layers"], ffn=proj,
            rel_buckets=config.get("relative_attention_num_buckets", 32),
            rel_max_distance=config.get("relative_attention_max_distance", 128),
            per_layer_position_bias=model_type == "umt5", eps=config.get("layer_norm_epsilon", 1e-6),
            max_length=max_length,
        )
    except KeyError as e:
        raise ValueError(f"T5 config dict lacks field {e.args[0]!r}; pass the full config.json") from None


__all__ = ["SOURCES", "t5_keymap", "convert_t5", "t5_config_from_hf"]
