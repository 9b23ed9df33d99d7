"""Put concept adapters into a model by module name, and steer them: stages, scales, merging.

Targets are explicit anchored patterns, matched with `re.fullmatch` against the names of
`model.named_modules()`. A matched `nn.Linear` is replaced in its parent by a `LoRALinear` that
shares its weight and bias (base state_dict keys unchanged); a matched `LoRALinear` gets one more
adapter, which is how several separately trained concepts sit in one model.

Parameter names carry the role, so a stage is a `requires_grad_` over a name filter:
`{module}.adapters.{concept}.lora_A1 | lora_B1 | lora_B2`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora.layers import ConceptAdapter, LoRALinear

# Self- and cross-attention q/k/v/o and both MLP linears of every DiT block (Wan's names).
DEFAULT_TARGETS: tuple[str, ...] = (
    r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)",
    r"blocks\.\d+\.ffn\.(0|2)",
)
# Which tensors each stage trains: 1 = identity basis (A1, B1), 2 = motion residual (B2), 0 = none.
STAGE_TENSORS: dict[int, tuple[str, ...]] = {0: (), 1: ("lora_A1", "lora_B1"), 2: ("lora_B2",)}
# Dropout p on the trained B per stage (paper Table 6).
STAGE_DROPOUT: dict[int, float] = {0: 0.0, 1: 0.8, 2: 0.5}
LORA_TENSORS = ("lora_A1", "lora_B1", "lora_B2")

_PARAM_NAME = re.compile(r"(?P<module>.+)\.adapters\.(?P<concept>[^.]+)\.(?P<tensor>lora_A1|lora_B1|lora_B2)")


@dataclass(frozen=True)
class LoRAConfig:
    """What a personalization run asks of the LoRA."""

    rank: int = 32  # "high rank + dropout on B" (paper §3.4.2); the paper gives no number
    targets: tuple[str, ...] = DEFAULT_TARGETS
    stage1_dropout: float = STAGE_DROPOUT[1]
    stage2_dropout: float = STAGE_DROPOUT[2]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        for name in ("stage1_dropout", "stage2_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"LoRA {name} must be in [0, 1), got {p}")
        for pattern in self.targets:
            re.compile(pattern)


def find_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the modules the patterns fully match, in model order. Every pattern must match
    at least one module, and only nn.Linear ones."""
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    found: set[str] = set()
    for pattern in targets:
        regex = re.compile(pattern)
        hits = [name for name in names if regex.fullmatch(name)]
        if not hits:
            hint = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"LoRA target {pattern!r} matches no module; names look like: {hint}")
        for name in hits:
            if not isinstance(modules[name], nn.Linear):
                kind = type(modules[name]).__name__
                raise ValueError(f"LoRA target {pattern!r} matches {name!r}, a {kind}; "
                                 "only nn.Linear layers can carry a LoRA, narrow the pattern")
        found.update(hits)
    return [name for name in names if name in found]


def inject_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, rank: int = 32, *,
                name: str = "concept", dtype: torch.dtype = torch.float32) -> list[str]:
    """Give every targeted Linear a fresh adapter `name` (a no-op until trained). Returns the module names."""
    hits = find_targets(model, targets)
    for module_name in hits:
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear.from_linear(layer)
            setattr(parent, attr, layer)
        layer.add_adapter(name, rank, dtype=dtype)
    return hits


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def concept_names(model: nn.Module) -> list[str]:
    """Names of the concepts held by the model's LoRA layers, in first-seen order."""
    seen: dict[str, None] = {}
    for layer in lora_layers(model).values():
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def concept_adapters(model: nn.Module, concept: str | None = None) -> dict[str, ConceptAdapter]:
    """Module name -> that module's adapter for `concept` (None: the only concept there is)."""
    concept = _resolve(model, concept)
    layers = lora_layers(model)
    return {name: layer.adapters[concept] for name, layer in layers.items() if concept in layer.adapters}


def remove_concept(model: nn.Module, concept: str) -> None:
    """Drop a concept's adapters; layers left with none go back to plain nn.Linear (or FP8Linear)."""
    for name in concept_adapters(model, concept):
        module = model.get_submodule(name)
        module.remove_adapter(concept)
        if not module.adapters:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.to_plain())


def set_stage(model: nn.Module, stage: int, *, concepts: Sequence[str] | None = None,
              dropout: float | None = None) -> list[str]:
    """Make exactly the stage's LoRA tensors of `concepts` (default: all) trainable; freeze every
    other parameter of the model, base weights included. Sets the coefficient dropout of those
    adapters (default: the paper's p for the stage). Returns the trainable parameter names."""
    if stage not in STAGE_TENSORS:
        raise ValueError(f"unknown stage {stage}; use 1 (identity basis), 2 (motion residual) or 0 (frozen)")
    held = concept_names(model)
    chosen = held if concepts is None else list(concepts)
    missing = sorted(set(chosen) - set(held))
    if missing:
        raise ValueError(f"model holds no concept {missing}; it holds {held}")
    if stage > 0 and any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError(f"cannot set training stage {stage} while the LoRA is merged; "
                           "call unmerge_lora() first")
    p = STAGE_DROPOUT[stage] if dropout is None else dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"LoRA coefficient dropout must be in [0, 1), got {p}")

    trainable = []
    for param_name, param in model.named_parameters():
        m = _PARAM_NAME.fullmatch(param_name)
        train = bool(m) and m["concept"] in chosen and m["tensor"] in STAGE_TENSORS[stage]
        param.requires_grad_(train)
        if train:
            trainable.append(param_name)
    for concept in chosen:
        for adapter in concept_adapters(model, concept).values():
            adapter.dropout = p
    return trainable


def set_scales(model: nn.Module, identity: float = 1.0, motion: float = 1.0,
               concept: str | None = None) -> None:
    """Identity scale alpha and motion scale beta of one concept (None: the only one)."""
    for name, adapter in concept_adapters(model, concept).items():
        if model.get_submodule(name).merged:
            raise RuntimeError("cannot change LoRA scales while merged; call unmerge_lora() first")
        adapter.alpha, adapter.beta = float(identity), float(motion)


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def concept_state_dict(model: nn.Module, concept: str | None = None) -> dict[str, Tensor]:
    """A concept's LoRA tensors only: `{module}.lora_A1|lora_B1|lora_B2` -> tensor (detached)."""
    out = {}
    for name, adapter in concept_adapters(model, concept).items():
        for tensor in LORA_TENSORS:
            out[f"{name}.{tensor}"] = getattr(adapter, tensor).detach()
    return out


@torch.no_grad()
def load_concept_state_dict(model: nn.Module, state_dict: dict[str, Tensor],
                            concept: str | None = None) -> None:
    """Strict inverse of concept_state_dict: every key present, none extra, shapes equal."""
    own = concept_state_dict(model, concept)
    missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or extra:
        raise ValueError(f"LoRA tensors do not match the model's adapters: missing {missing[:4]} "
                         f"({len(missing)}), unexpected {extra[:4]} ({len(extra)})")
    for key, target in own.items():
        if state_dict[key].shape != target.shape:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(state_dict[key].shape)}, "
                             f"the model's adapter has {tuple(target.shape)}")
        target.copy_(state_dict[key])


def _resolve(model: nn.Module, concept: str | None) -> str:
    held = concept_names(model)
    if concept is None:
        if len(held) != 1:
            raise ValueError(f"model holds concepts {held}; name the one you mean")
        return held[0]
    if concept not in held:
        raise ValueError(f"model holds no concept {concept!r}; it holds {held}")
    return concept
