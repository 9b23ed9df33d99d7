"""A base model as one bundle: its config, its three networks and its tokenizer.

`weights.base.load_base` builds it (from a checkpoint folder, a preset's committed weights, or random
weights when asked); personalization, generation and the toy runner take it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .tokenizer import Tokenizer


@dataclass
class Base:
    config: ModelConfig
    dit: nn.Module  # a two-expert base (Wan 2.2 A14B): model.experts.ExpertPair, both experts in one module
    vae: nn.Module
    t5: nn.Module
    tokenizer: Tokenizer
    name: str  # the base model's name as concept files record it (its config name)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype


__all__ = ["Base"]
