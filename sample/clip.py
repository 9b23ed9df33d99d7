"""CLIP-T, the paper's text-alignment column, of a video and a prompt, with a given CLIP model.

CLIP-T (paper section 5.1): the cosine between the prompt's text embedding and the mean of the video's
frame embeddings (each L2-normalised, the mean normalised again). Raw cosine: the paper's values are
0.20-0.25 for openai/clip-vit-large-patch14-sized models. The model comes from weights/clip.load_clip.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from lora.tokens import TOKEN_LIKE
from model.clip import ClipModel, Preprocess
from model.clip_tokenizer import ClipTokenizer

# Concept tokens such as "[v]" or "[u2]" (lora.tokens.TOKEN_LIKE) mean nothing to CLIP: the prompt is
# scored without them and the space before each.
PLACEHOLDER = re.compile(r"\s*" + TOKEN_LIKE.pattern)


class ClipTextScorer:
    """CLIP-T of a video and a prompt: a `clip_scorer` for sample/metrics.score_video.

    Takes what weights/clip.load_clip returns: `ClipTextScorer(*load_clip(folder, device))`.
    """

    def __init__(self, model: ClipModel, tokenizer: ClipTokenizer, preprocess: Preprocess, batch: int = 16):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.batch = next(model.parameters()).device, batch

    @torch.inference_mode()
    def video_embedding(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (P,): the normalised mean of the normalised frame embeddings."""
        frames = torch.as_tensor(np.ascontiguousarray(frames), device=self.device)
        parts = [self.model.embed_images(self.preprocess(frames[i: i + self.batch]))
                 for i in range(0, len(frames), self.batch)]
        return F.normalize(torch.cat(parts).mean(0), dim=0)

    @torch.inference_mode()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        text = PLACEHOLDER.sub("", prompt).strip()
        ids = torch.tensor([self.tokenizer.encode(text, max_length=self.model.config.max_positions)],
                           device=self.device)
        return self.model.embed_text(ids)[0]

    def __call__(self, frames: np.ndarray, prompt: str) -> float:
        return float(self.video_embedding(frames) @ self.text_embedding(prompt))


__all__ = ["PLACEHOLDER", "ClipTextScorer"]
