"""Export concepts as a standard rank-r LoRA for Wan 2.1's own tools.

A concept exports as lora_A = A1 and lora_B = identity * B1 + motion * B2 per layer: the scales are
baked into lora_B and there is NO alpha key (the effective update is exactly lora_B @ lora_A).
Several concepts concatenate along the rank dimension (A rows, B columns), which sums their
updates: [B_1 B_2] @ [A_1; A_2] = B_1 A_1 + B_2 A_2.

Formats:
    "comfyui"    Wan's original module names: `diffusion_model.blocks.0.self_attn.q.lora_A.weight`.
                 ComfyUI loads this natively; diffusers' Wan loader converts it.
    "diffusers"  diffusers' WanTransformer3DModel names with the pipeline prefix:
                 `transformer.blocks.0.attn1.to_q.lora_A.weight` (what `load_lora_weights` and
                 `load_lora_adapter(..., prefix="transformer")` take after their own conversion).

Two-expert bases (Wan 2.2 A14B): a concept's layers sit under `high.` and `low.` (model/experts.py) and
export as one file per expert, each in the names above: ComfyUI loads them as the high- and low-noise
LoRAs, diffusers as `pipe.load_lora_weights(high)` and `pipe.load_lora_weights(low,
load_into_transformer_2=True)` (transformer_2 is the low-noise expert).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lora.concept import Concept, write_safetensors

FORMATS = ("comfyui", "diffusers")
EXPERTS = ("high", "low")  # the module-name prefixes of a two-expert base's experts

# Wan original module name -> diffusers WanTransformer3DModel name (after diffusers'
# _convert_non_diffusers_wan_lora_to_diffusers), anchored.
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_DIFFUSERS_NAMES: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r"blocks\.(\d+)\.self_attn\.(q|k|v|o)"), lambda m: f"blocks.{m[1]}.attn1.{_ATTN[m[2]]}"),
    (re.compile(r"blocks\.(\d+)\.cross_attn\.(q|k|v|o)"), lambda m: f"blocks.{m[1]}.attn2.{_ATTN[m[2]]}"),
    (re.compile(r"blocks\.(\d+)\.ffn\.0"), lambda m: f"blocks.{m[1]}.ffn.net.0.proj"),
    (re.compile(r"blocks\.(\d+)\.ffn\.2"), lambda m: f"blocks.{m[1]}.ffn.net.2"),
    (re.compile(r"text_embedding\.0"), lambda m: "condition_embedder.text_embedder.linear_1"),
    (re.compile(r"text_embedding\.2"), lambda m: "condition_embedder.text_embedder.linear_2"),
    (re.compile(r"time_embedding\.0"), lambda m: "condition_embedder.time_embedder.linear_1"),
    (re.compile(r"time_embedding\.2"), lambda m: "condition_embedder.time_embedder.linear_2"),
    (re.compile(r"time_projection\.1"), lambda m: "condition_embedder.time_proj"),
    (re.compile(r"head\.head"), lambda m: "proj_out"),
)


def diffusers_module_name(module: str) -> str:
    """Our (= Wan's original) module name -> diffusers' Wan name. Modules of ours that Wan lacks
    (self_cond_embedding, per-block adaLN, ...) have none and raise."""
    for pattern, rename in _DIFFUSERS_NAMES:
        m = pattern.fullmatch(module)
        if m:
            return rename(m)
    raise ValueError(f"layer {module!r} has no counterpart in Wan 2.1; export only concepts whose targets "
                     "are Wan modules (attention q/k/v/o, ffn.0/2, text/time embeddings, head.head)")


Factors = dict[str, tuple[Tensor, Tensor]]  # module -> (A (r, in), B (out, r))


def rank_factors(concept: Concept, identity: float = 1.0, motion: float = 1.0) -> Factors:
    """module -> (A (r, in), B (out, r)) with A = A1 and B = identity * B1 + motion * B2, fp32."""
    out = {}
    for module in concept.modules:
        a1, b1, b2 = (t.float() for t in concept.factors(module))
        out[module] = (a1, identity * b1 + motion * b2)
    return out


def concat_along_rank(factor_sets: Sequence[Factors]) -> Factors:
    """Stack several LoRAs into one whose update is their sum: A rows and B columns concatenated.
    A layer only some of them touch gets only their ranks."""
    modules = sorted({m for factors in factor_sets for m in factors})
    out = {}
    for module in modules:
        pairs = [factors[module] for factors in factor_sets if module in factors]
        shapes = {(b.shape[0], a.shape[1]) for a, b in pairs}
        if len(shapes) != 1:
            raise ValueError(f"layer {module}: the LoRAs disagree on its (out, in) shape: {sorted(shapes)}")
        out[module] = (torch.cat([a for a, _ in pairs], dim=0), torch.cat([b for _, b in pairs], dim=1))
    return out


def concept_experts(concept: Concept) -> tuple[str, ...]:
    """The experts a two-expert concept has layers on ("high", "low" or both); () for a one-DiT concept."""
    return tuple(e for e in EXPERTS if any(m.startswith(f"{e}.") for m in concept.modules))


def expert_factors(factors: Factors, expert: str | None, names: str) -> Factors:
    """The layers of one expert, its prefix dropped (the expert's own DiT names); all layers when None."""
    prefixed = {m for m in factors if m.split(".", 1)[0] in EXPERTS}
    if expert is None:
        if prefixed:
            raise ValueError(f"{names} belong to a two-expert base (layers under high./low.); export each "
                             "expert on its own (expert='high' and expert='low')")
        return factors
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; choose one of {EXPERTS}")
    out = {m.split(".", 1)[1]: f for m, f in factors.items() if m.startswith(f"{expert}.")}
    if not out:
        raise ValueError(f"{names} have no layers on the {expert}-noise expert (trained with --expert "
                         f"{'low' if expert == 'high' else 'high'}?); export the expert they were trained on")
    return out


def export_lora(concepts: Concept | Sequence[Concept], format: str = "comfyui",
                identity: float | Sequence[float] = 1.0, motion: float | Sequence[float] = 1.0,
                dtype: torch.dtype = torch.float32, expert: str | None = None) -> dict[str, Tensor]:
    """A standard LoRA state dict (no alpha keys) for one concept or several concatenated along
    the rank. `identity` / `motion` are the scales, one value for all concepts or one per concept.
    `expert` ("high" or "low") picks one expert of a two-expert concept; None for one-DiT concepts."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA export format {format!r}; choose one of {FORMATS}")
    concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
    if not concepts:
        raise ValueError("export_lora needs at least one concept")
    alphas = _per_concept(identity, len(concepts), "identity")
    betas = _per_concept(motion, len(concepts), "motion")
    bases = {c.base for c in concepts}
    if len(bases) != 1:
        raise ValueError(f"concepts belong to different base models {sorted(map(str, bases))}; "
                         "export them separately")
    per_concept = [rank_factors(c, a, b) for c, a, b in zip(concepts, alphas, betas, strict=True)]
    names = "concepts " + ", ".join(repr(c.name) for c in concepts)
    factors = expert_factors(concat_along_rank(per_concept), expert, names)
    out = {}
    for module, (a, b) in factors.items():
        theirs = diffusers_module_name(module)  # also refuses layers Wan does not have, in either format
        name = f"diffusion_model.{module}" if format == "comfyui" else f"transformer.{theirs}"
        out[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


def export_metadata(concepts: Concept | Sequence[Concept], format: str, identity, motion,
                    expert: str | None = None) -> dict[str, str]:
    concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
    extra = {} if expert is None else {"expert": f"{expert}-noise"}
    return {
        **extra,
        "format": f"setseq-lora-{format}",
        "base": json.dumps({"name": concepts[0].base.name, "fingerprint": concepts[0].base.fingerprint}),
        "concepts": json.dumps([
            {"name": c.name, "rank": c.rank, "tokens": list(c.tokens), "prompts": c.prompts} for c in concepts
        ]),
        "identity": json.dumps(_per_concept(identity, len(concepts), "identity")),
        "motion": json.dumps(_per_concept(motion, len(concepts), "motion")),
        "note": "scales baked into lora_B; no alpha: the update is lora_B @ lora_A",
    }


def save_lora(path: str | os.PathLike, concepts: Concept | Sequence[Concept], format: str = "comfyui",
              identity: float | Sequence[float] = 1.0, motion: float | Sequence[float] = 1.0,
              dtype: torch.dtype = torch.float32, expert: str | None = None) -> dict[str, Tensor]:
    """export_lora written to `path` (safetensors + metadata, atomic). Returns the state dict."""
    state = export_lora(concepts, format, identity, motion, dtype, expert)
    write_safetensors(Path(path), state, export_metadata(concepts, format, identity, motion, expert))
    return state


def expert_path(path: str | os.PathLike, expert: str) -> Path:
    """One expert's file of a two-expert export: `out.safetensors` -> `out.high_noise.safetensors`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{expert}_noise{path.suffix}")


def _per_concept(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} scales for {n} concepts; give one value or one per concept")
    return values
