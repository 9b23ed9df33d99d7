"""Set-and-Sequence concept LoRA: the layer (layers), injection and stages (inject), the concept
file (concept) and export to standard LoRA files (export)."""

from lora.concept import (
    BaseIdentity,
    Concept,
    apply_concept,
    base_identity,
    concept_from_model,
    load_concept,
    save_concept,
)
from lora.export import concat_along_rank, export_lora, save_lora
from lora.inject import (
    DEFAULT_TARGETS,
    STAGE_DROPOUT,
    LoRAConfig,
    concept_names,
    concept_state_dict,
    inject_lora,
    load_concept_state_dict,
    merge_lora,
    remove_concept,
    set_scales,
    set_stage,
    unmerge_lora,
)
from lora.layers import ConceptAdapter, LoRALinear

__all__ = [
    "BaseIdentity", "Concept", "apply_concept", "base_identity", "concept_from_model", "load_concept",
    "save_concept", "concat_along_rank", "export_lora", "save_lora", "DEFAULT_TARGETS", "STAGE_DROPOUT",
    "LoRAConfig", "concept_names", "concept_state_dict", "inject_lora", "load_concept_state_dict",
    "merge_lora", "remove_concept", "set_scales", "set_stage", "unmerge_lora", "ConceptAdapter", "LoRALinear",
]
