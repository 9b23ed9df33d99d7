"""benchmarks/concept_probe.py: switching an adapter group off zeroes exactly that group's coefficients."""

import re

import torch

from benchmarks.concept_probe import GROUPS, switch_off
from lora.inject import DEFAULT_TARGETS, inject_lora
from lora.layers import ConceptAdapter
from model.config import DiTConfig
from model.dit import DiT
from train.recipe import HEAD_TARGET

SMALL = DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=2, ffn_dim=64, text_dim=16,
                  qk_norm="rms_per_head", rope_split=(8, 4, 4))


def _adapted() -> tuple[DiT, dict[str, ConceptAdapter]]:
    torch.manual_seed(0)
    dit = DiT(SMALL)
    inject_lora(dit, (*DEFAULT_TARGETS, HEAD_TARGET), rank=2, name="c")
    adapters = {n: m for n, m in dit.named_modules() if isinstance(m, ConceptAdapter)}
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B1.normal_()
            m.lora_B2.normal_()
    return dit, adapters


def test_each_group_switches_off_its_adapters_and_no_other():
    per_block = {"head": 1, "ffn": 4, "self_attn": 8, "cross_qo": 4, "cross_kv": 4, "every_block": 20}
    for group, count in per_block.items():
        dit, adapters = _adapted()
        assert switch_off(dit, GROUPS[group]) == count
        for name, m in adapters.items():
            off = bool(re.search(GROUPS[group], name))
            assert bool((m.lora_B1 == 0).all() and (m.lora_B2 == 0).all()) == off, (group, name)
    dit, _ = _adapted()
    assert switch_off(dit, GROUPS["none"]) == 0
