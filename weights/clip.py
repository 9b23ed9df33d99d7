"""A local HF CLIP folder into `model.clip.ClipModel`, its tokenizer and its preprocessing.

The folder is what `CLIPModel.save_pretrained` writes (e.g. a local copy of openai/clip-vit-large-patch14):
`config.json`, the weights (`model.safetensors` or `pytorch_model.bin`), the tokenizer (`vocab.json` +
`merges.txt`, or `tokenizer.json`) and, optionally, `preprocessor_config.json`. Nothing is downloaded.
Our module names are HF's, so the state dict loads strictly as it is (less the `position_ids` buffers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.clip import OPENAI_MEAN, OPENAI_STD, ClipConfig, ClipModel, Preprocess, TowerConfig
from model.clip_tokenizer import ClipTokenizer
from weights.io import find_weights_file, read_state_dict
from weights.load import load_into


def clip_config_from_hf(config: dict) -> ClipConfig:
    """A CLIPModel config.json as a dict -> our ClipConfig (missing fields take transformers' defaults)."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}

    def tower(c: dict, width: int, layers: int, heads: int, mlp: int) -> TowerConfig:
        return TowerConfig(c.get("hidden_size", width), c.get("num_hidden_layers", layers),
                           c.get("num_attention_heads", heads), c.get("intermediate_size", mlp),
                           c.get("hidden_act", "quick_gelu"), c.get("layer_norm_eps", 1e-5))

    return ClipConfig(text=tower(text, 512, 12, 8, 2048), vision=tower(vision, 768, 12, 12, 3072),
                      vocab_size=text.get("vocab_size", 49408),
                      max_positions=text.get("max_position_embeddings", 77),
                      image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
                      projection_dim=config.get("projection_dim", 512),
                      eos_token_id=text.get("eos_token_id", 49407))


def preprocess_from_hf(config: dict, image_size: int) -> Preprocess:
    """A preprocessor_config.json as a dict (empty: CLIPImageProcessor's defaults at image_size)."""
    size, crop = config.get("size", image_size), config.get("crop_size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return Preprocess(size, crop, tuple(config.get("image_mean", OPENAI_MEAN)),
                      tuple(config.get("image_std", OPENAI_STD)))


def check_folder(folder: str | Path) -> Path:
    """FileNotFoundError unless `folder` looks like a saved HF CLIP model (cheap: before any weights load)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {str(folder)!r}: expected a HF CLIP folder with config.json, "
                                "the weights (model.safetensors or pytorch_model.bin) and the tokenizer "
                                "files, as CLIPModel.save_pretrained writes them")
    return folder


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> tuple[ClipModel, ClipTokenizer,
                                                                               Preprocess]:
    """The model, tokenizer and preprocessing of a local HF CLIP folder (fp32, eval mode, frozen)."""
    folder = check_folder(folder)
    raw = json.loads((folder / "config.json").read_text())
    if "text_config" not in raw or "vision_config" not in raw:
        raise ValueError(f"{folder / 'config.json'} is not a CLIPModel config (no text_config and "
                         "vision_config); the folder must hold a full CLIP model, both towers")
    config = clip_config_from_hf(raw)
    weights = find_weights_file(folder)
    state = {k: v for k, v in read_state_dict(weights).items() if not k.endswith("position_ids")}
    model = load_into(lambda: ClipModel(config), state, device=device, source=str(weights))
    pre_file = folder / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    preprocess = preprocess_from_hf(pre, config.image_size)
    return model.requires_grad_(False), ClipTokenizer.from_dir(folder), preprocess


__all__ = ["clip_config_from_hf", "preprocess_from_hf", "check_folder", "load_clip"]
