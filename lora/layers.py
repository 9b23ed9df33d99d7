"""The Set-and-Sequence LoRA layer: one shared basis, two coefficient sets.

For a linear layer with weight W (out x in), one concept adds, in the torch/PEFT orientation,

    ΔW = (alpha * B1 + beta * B2) @ A1

    lora_A1 (r, in)   the basis (PEFT's lora_A, "down"), trained in stage 1
    lora_B1 (out, r)  identity coefficients (PEFT's lora_B, "up"), trained in stage 1
    lora_B2 (out, r)  motion coefficients, trained in stage 2 on the frozen A1, B1
    alpha, beta       identity and motion scales (plain floats, not saved: 1, 1 = the full concept)

The paper writes ΔW = A B with the letters swapped; keeping PEFT's letters means a concept exports
as a standard LoRA with lora_A = A1 and lora_B = alpha * B1 + beta * B2.

Dropout acts on the coefficients, not the input (this is not PEFT's lora_dropout): while training,
every trained B (one with requires_grad) is multiplied by an elementwise Bernoulli keep-mask, one
mask per forward call, scaled by 1 / (1 - p) so evaluation needs no correction.

`LoRALinear` is an `nn.Linear` subclass: its own `weight` and `bias` are the base layer's
parameters under their original names, so the base model's state_dict keys do not change when a
layer is wrapped. The concepts live in `adapters`, a ModuleDict keyed by concept name, giving keys
like `blocks.0.self_attn.q.adapters.dancer.lora_A1`; the forward adds every adapter's delta.
Wrapping an fp8 layer (model/fp8.py's FP8Linear) shares its `weight_scale` too, and the base product
dequantizes like FP8Linear's; merging into fp8 weights is refused (it would requantize the base).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fp8 import FP8Linear, dequantize, fp8_linear
from model.offload import host_copy


class ConceptAdapter(nn.Module):
    """One concept's low-rank update of an (out x in) weight."""

    def __init__(self, in_features: int, out_features: int, rank: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.lora_A1 = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B1 = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_B2 = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.alpha = 1.0  # identity scale
        self.beta = 1.0  # motion scale
        self.dropout = 0.0  # drop probability of the mask on trained B; set per stage by set_stage()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A1 like PEFT's lora_A (and nn.Linear): kaiming-uniform with a = sqrt(5).
        nn.init.kaiming_uniform_(self.lora_A1, a=math.sqrt(5))
        # B1 and B2 zero: a fresh adapter is a no-op, and stage 2 starts from the stage-1 result.
        nn.init.zeros_(self.lora_B1)
        nn.init.zeros_(self.lora_B2)

    @property
    def rank(self) -> int:
        return self.lora_A1.shape[0]

    def _dropped(self, b: Tensor) -> Tensor:
        """B ⊙ M / (1 - p) for a trained B in training mode; B unchanged otherwise."""
        p = self.dropout
        if not (self.training and b.requires_grad and p > 0.0):
            return b
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA coefficient dropout must be in [0, 1), got {p}")
        keep = torch.empty_like(b).bernoulli_(1.0 - p)
        return b * keep / (1.0 - p)

    def coefficients(self) -> Tensor:
        """alpha * B1 + beta * B2 with the training mask on whichever B is trained. (out, r)"""
        return self.alpha * self._dropped(self.lora_B1) + self.beta * self._dropped(self.lora_B2)

    def delta_weight(self, alpha: float | None = None, beta: float | None = None) -> Tensor:
        """ΔW = (alpha * B1 + beta * B2) @ A1 in fp32, no mask. (out, in)"""
        a = self.alpha if alpha is None else alpha
        b = self.beta if beta is None else beta
        return (a * self.lora_B1.float() + b * self.lora_B2.float()) @ self.lora_A1.float()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> ΔW x (..., out): project on the basis once, then apply the (masked) B."""
        if x.dtype != self.lora_A1.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A1.dtype)  # under autocast F.linear picks the compute dtype itself
        h = F.linear(x, self.lora_A1)  # (..., r)
        return F.linear(h, self.coefficients())  # (..., out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, beta={self.beta}, dropout={self.dropout}"


def _token_weights(weights: Tensor, x: Tensor) -> Tensor:
    """(L,) region weights as (L, 1), after checking x (..., L, in) has L tokens."""
    if x.ndim < 2 or x.shape[-2] != weights.shape[0]:
        raise ValueError(f"a region of {weights.shape[0]} tokens cannot weight an input of shape "
                         f"{tuple(x.shape)}: the region was made for another video size")
    return weights.to(x.device)[:, None]


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` parameters and names) plus named concept adapters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapters = nn.ModuleDict()
        # Scales folded into `weight` by merge(), per adapter; None when not merged.
        self._merged_scales: dict[str, tuple[float, float]] | None = None
        # Per-token weights (L,) of an adapter's output, by concept, while lora/regions.py confines it.
        self.regions: dict[str, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LoRALinear:
        """Wrap `linear`, sharing its weight and bias Parameters (nothing is copied)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        if isinstance(linear, FP8Linear):
            new.register_buffer("weight_scale", linear.weight_scale)
            new.block = linear.block
        new.train(linear.training)
        return new

    @property
    def fp8(self) -> bool:
        return "weight_scale" in self._buffers

    @torch.no_grad()
    def base_norm(self) -> Tensor:
        """Frobenius norm of the base weight, fp32, on the layer's device: dequantized when fp8, read from
        the host copy while the layer's block is offloaded (model/offload.py)."""
        w = host_copy(self.weight)
        if self.fp8:
            w = dequantize(w, host_copy(self.weight_scale).to(w.device), self.block, torch.float32)
        return w.float().norm().to(self.weight.device)

    def to_plain(self) -> nn.Linear:
        """The layer without adapters (an nn.Linear, or an FP8Linear for fp8 weights), sharing the tensors."""
        if self.fp8:
            plain = FP8Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                              block=self.block)
            plain.weight_scale = self.weight_scale
        else:
            plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    @property
    def merged(self) -> bool:
        return self._merged_scales is not None

    def add_adapter(self, name: str, rank: int, dtype: torch.dtype = torch.float32) -> ConceptAdapter:
        if not name or "." in name:
            raise ValueError(f"concept name {name!r} must be non-empty and contain no '.'")
        if name in self.adapters:
            raise ValueError(f"layer already holds a concept named {name!r}; pick another name or remove it")
        self._refuse_if_merged(f"add concept {name!r}")
        device = self.weight.device
        adapter = ConceptAdapter(self.in_features, self.out_features, rank, device=device, dtype=dtype)
        adapter.requires_grad_(False)  # frozen until a stage says what trains (inject.set_stage)
        adapter.train(self.training)
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        self._refuse_if_merged(f"remove concept {name!r}")
        if name not in self.adapters:
            raise ValueError(f"layer holds no concept {name!r}; it holds {list(self.adapters)}")
        del self.adapters[name]

    def delta_weight(self) -> Tensor:
        """Sum of every adapter's ΔW at its current scales, fp32. (out, in)"""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for adapter in self.adapters.values():
            delta += adapter.delta_weight()
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter's ΔW into `weight` (fp32 accumulation); the forward then skips them."""
        self._refuse_if_merged("merge again")
        if self.fp8:
            raise RuntimeError("cannot merge a LoRA into fp8 base weights (it would requantize them); "
                               "keep the adapters unmerged, or load the base without --base-dtype fp8")
        scales = {name: (a.alpha, a.beta) for name, a in self.adapters.items()}
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self._merged_scales = scales

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what merge() added, at the scales it used."""
        if self._merged_scales is None:
            raise RuntimeError("unmerge() on a LoRA layer that is not merged")
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for name, (alpha, beta) in self._merged_scales.items():
            delta += self.adapters[name].delta_weight(alpha, beta)
        self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))
        self._merged_scales = None

    def _refuse_if_merged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} while the LoRA is merged into the base weight; "
                               "call unmerge() first")

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8:
            y = fp8_linear(x, self.weight, self.weight_scale, self.block, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training and any(p.requires_grad for p in self.adapters.parameters()):
                raise RuntimeError("cannot train a LoRA while it is merged into the base weight; "
                                   "call unmerge() first")
            return y
        for name, adapter in self.adapters.items():
            delta = adapter(x)
            if self.regions is not None and name in self.regions:
                delta = delta * _token_weights(self.regions[name], x).to(delta.dtype)
            y = y + delta.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", concepts={list(self.adapters)}, merged={self.merged}"
