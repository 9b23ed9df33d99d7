"""CLIP (text and image towers, HF `CLIPModel` layout) and its image preprocessing.

Module and parameter names follow HF's `CLIPModel`, so its state dict loads strictly as it is
(weights/clip.py reads a saved folder); the parity with `transformers.CLIPModel` is tested
(tests/test_clip.py).

Preprocessing follows `CLIPImageProcessor`: resize the short side to `size` (bicubic, antialiased,
rounded to uint8 as PIL does), centre crop, scale to [0, 1], normalise by the model's mean and std.
Torch's bicubic is not PIL's to the last bit: pixels may differ by a level or two (measured in the test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# CLIPImageProcessor's defaults (OpenAI's training statistics).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TowerConfig:
    width: int
    layers: int
    heads: int
    mlp: int
    act: str = "quick_gelu"  # OpenAI's CLIP; LAION's HF conversions say "gelu"
    eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"CLIP tower width {self.width} is not divisible by its {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CLIP activation {self.act!r} is not supported; "
                             f"expected one of {list(ACTIVATIONS)}")


@dataclass(frozen=True)
class ClipConfig:
    text: TowerConfig
    vision: TowerConfig
    vocab_size: int = 49408
    max_positions: int = 77
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    # HF rule: configs written before transformers PR #24773 say 2 and pool at the largest token id
    # (OpenAI's end-of-text is the last id); newer ones name the id and pool at its first occurrence.
    eos_token_id: int = 49407


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.width, c.width) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, D = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
            return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.width, c.mlp), nn.Linear(c.mlp, c.width)
        self.act = ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer layer (HF `CLIPEncoderLayer`)."""

    def __init__(self, c: TowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.eps)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.eps)
        self.self_attn, self.mlp = Attention(c), MLP(c)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.text.width)
        self.position_embedding = nn.Embedding(c.max_positions, c.text.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextTower(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.embeddings, self.encoder = TextEmbeddings(c), Encoder(c.text)
        self.final_layer_norm = nn.LayerNorm(c.text.width, eps=c.text.eps)
        self.eos_token_id = c.eos_token_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D): the final state at each prompt's end-of-text token."""
        if ids.shape[1] > self.embeddings.position_embedding.num_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed CLIP's "
                             f"{self.embeddings.position_embedding.num_embeddings} positions; truncate")
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))
        at = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
        return x[torch.arange(len(ids), device=ids.device), at]


class VisionEmbeddings(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        D = c.vision.width
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.patch_embedding = nn.Conv2d(3, D, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, D)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1 + patches, D)
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.embeddings, self.encoder = VisionEmbeddings(c), Encoder(c.vision)
        self.pre_layrnorm = nn.LayerNorm(c.vision.width, eps=c.vision.eps)  # sic: HF's key name
        self.post_layernorm = nn.LayerNorm(c.vision.width, eps=c.vision.eps)
        self.image_size = c.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D): the class token's final state."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP image tower takes {self.image_size}x{self.image_size} pixels, got "
                             f"{tuple(pixels.shape[-2:])}; use Preprocess")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])


@dataclass(frozen=True)
class Preprocess:
    size: int = 224  # short side after resizing
    crop: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, crop_h, crop_w) float32, normalised."""
        x = frames.permute(0, 3, 1, 2).float()
        H, W = x.shape[-2:]
        short, long = (H, W) if H <= W else (W, H)
        new_long = int(self.size * long / short)
        new = (self.size, new_long) if H <= W else (new_long, self.size)
        if new != (H, W):
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)  # PIL returns uint8
        (ch, cw), (H, W) = self.crop, x.shape[-2:]
        if ch > H or cw > W:
            raise ValueError(f"CLIP crop {self.crop} is larger than the resized frame {(H, W)}")
        top, left = (H - ch) // 2, (W - cw) // 2
        x = x[..., top: top + ch, left: left + cw] / 255.0
        mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (self.mean, self.std))
        return (x - mean) / std


class ClipModel(nn.Module):
    """HF `CLIPModel`'s towers and projections; `embed_text` and `embed_images` return unit vectors."""

    def __init__(self, c: ClipConfig):
        super().__init__()
        self.config = c
        self.text_model, self.vision_model = TextTower(c), VisionTower(c)
        self.text_projection = nn.Linear(c.text.width, c.projection_dim, bias=False)
        self.visual_projection = nn.Linear(c.vision.width, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # unused here; kept for the keys

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, P)
        return F.normalize(self.text_projection(self.text_model(ids)), dim=-1)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, P)
        return F.normalize(self.visual_projection(self.vision_model(pixels)), dim=-1)


__all__ = ["OPENAI_MEAN", "OPENAI_STD", "TowerConfig", "ClipConfig", "ClipModel", "TextTower", "VisionTower",
           "Preprocess"]
