"""Export to standard LoRA files (lora/export.py): exact ΔW, names, rank concatenation, and parity
with diffusers' Wan LoRA loading into the reference WanTransformer3DModel."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora.concept import Concept, base_identity, concept_from_model
from lora.export import concat_along_rank, diffusers_module_name, export_lora, save_lora
from lora.inject import DEFAULT_TARGETS, concept_adapters, concept_state_dict, inject_lora, set_scales
from model.config import DiTConfig
from model.dit import DiT

SMALL = DiTConfig(in_channels=4, out_channels=4, dim=24, heads=2, layers=2, ffn_dim=48, text_dim=32,
                  freq_dim=32, qk_norm="rms_across_heads", self_cond=False)


def _concept(name: str = "dancer", rank: int = 3, seed: int = 2, model: DiT | None = None) -> Concept:
    torch.manual_seed(0)
    model = model if model is not None else DiT(SMALL)
    inject_lora(model, DEFAULT_TARGETS, rank=rank, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in concept_state_dict(model, name).values():
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
    base = base_identity(model, "small-wan")
    return concept_from_model(model, name, base, adapter=name, targets=DEFAULT_TARGETS)


def _delta(concept: Concept, module: str, identity: float, motion: float) -> torch.Tensor:
    a1, b1, b2 = concept.factors(module)
    return (identity * b1 + motion * b2) @ a1


def test_exported_update_equals_our_delta():
    concept = _concept()
    model = DiT(SMALL)
    inject_lora(model, rank=3)
    with torch.no_grad():
        for key, t in concept_state_dict(model).items():
            t.copy_(concept.lora[key])
    set_scales(model, identity=0.6, motion=1.7)
    sd = export_lora(concept, "comfyui", identity=0.6, motion=1.7)
    for module, adapter in concept_adapters(model).items():
        a, b = sd[f"diffusion_model.{module}.lora_A.weight"], sd[f"diffusion_model.{module}.lora_B.weight"]
        assert a.shape == (3, adapter.lora_A1.shape[1]) and b.shape == (adapter.lora_B1.shape[0], 3)
        torch.testing.assert_close(b @ a, adapter.delta_weight(), rtol=0, atol=1e-6)
    a1 = concept.lora["blocks.0.ffn.2.lora_A1"]
    assert torch.equal(sd["diffusion_model.blocks.0.ffn.2.lora_A.weight"], a1)


def test_comfyui_names_and_no_alpha_key():
    sd = export_lora(_concept(), "comfyui")
    modules = [f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    modules += [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    want = {f"diffusion_model.{m}.lora_{x}.weight" for m in modules for x in "AB"}
    assert set(sd) == want
    assert not any("alpha" in k for k in sd)


def test_diffusers_names():
    sd = export_lora(_concept(), "diffusers")
    for name in ("transformer.blocks.0.attn1.to_q", "transformer.blocks.1.attn2.to_out.0",
                 "transformer.blocks.0.ffn.net.0.proj", "transformer.blocks.1.ffn.net.2"):
        assert f"{name}.lora_A.weight" in sd and f"{name}.lora_B.weight" in sd
    assert len(sd) == 2 * 2 * 10 and not any("alpha" in k for k in sd)
    assert diffusers_module_name("head.head") == "proj_out"
    with pytest.raises(ValueError, match="no counterpart in Wan"):
        diffusers_module_name("blocks.0.adaLN")


def test_diffusers_own_conversion_of_our_comfyui_file_gives_our_diffusers_file():
    loaders = pytest.importorskip("diffusers.loaders")
    concept = _concept()
    comfy = export_lora(concept, "comfyui", identity=0.5, motion=2.0)
    converted = loaders.WanLoraLoaderMixin.lora_state_dict(dict(comfy))
    ours = export_lora(concept, "diffusers", identity=0.5, motion=2.0)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], v) for k, v in ours.items())


def test_several_concepts_concatenate_along_rank():
    one, two = _concept("dancer", rank=3, seed=2), _concept("waves", rank=2, seed=3)
    sd = export_lora([one, two], "comfyui", identity=[1.0, 0.5], motion=[0.8, 1.2])
    for module in one.modules:
        a, b = sd[f"diffusion_model.{module}.lora_A.weight"], sd[f"diffusion_model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 5
        want = _delta(one, module, 1.0, 0.8) + _delta(two, module, 0.5, 1.2)
        torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-6)


def test_concat_along_rank_keeps_layers_only_some_concepts_touch():
    a1, b1 = torch.randn(2, 5), torch.randn(4, 2)
    a2, b2 = torch.randn(3, 5), torch.randn(4, 3)
    out = concat_along_rank([{"x": (a1, b1), "y": (a1, b1)}, {"x": (a2, b2)}])
    assert out["x"][0].shape == (5, 5) and out["y"][0].shape == (2, 5)
    torch.testing.assert_close(out["x"][1] @ out["x"][0], b1 @ a1 + b2 @ a2)
    with pytest.raises(ValueError, match="disagree"):
        concat_along_rank([{"x": (a1, b1)}, {"x": (torch.randn(2, 6), b1)}])


def test_export_refuses_unknown_format_and_mismatched_scales():
    concept = _concept()
    with pytest.raises(ValueError, match="unknown LoRA export format"):
        export_lora(concept, "kohya")
    with pytest.raises(ValueError, match="2 identity scales for 1 concepts"):
        export_lora(concept, identity=[1.0, 1.0])


def test_save_lora_writes_safetensors_with_metadata(tmp_path):
    concept = _concept()
    path = tmp_path / "dancer_comfy.safetensors"
    state = save_lora(path, concept, "comfyui", identity=0.9, motion=1.1, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(state)
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_B.weight").dtype == torch.bfloat16
    assert meta["format"] == "setseq-lora-comfyui"
    assert json.loads(meta["identity"]) == [0.9] and json.loads(meta["concepts"])[0]["name"] == "dancer"


# ------------------------------------------------------------------ parity with diffusers' loader

REF = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
           out_channels=4, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _reference():
    """A small diffusers Wan DiT with every parameter random (zero-init head included)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**REF).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref


def _inputs():
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    return x, torch.tensor([0.3, 0.8]), ctx


def test_export_diffusers_parity():
    pytest.importorskip("peft")
    loaders = pytest.importorskip("diffusers.loaders")
    from weights.wan_dit import convert_wan_dit, dit_config_from_diffusers

    ref = _reference()
    cfg = dit_config_from_diffusers(ref.config)
    ours = DiT(cfg).eval()
    ours.load_state_dict(convert_wan_dit(ref.state_dict(), "diffusers", cfg), strict=True)
    x, t, ctx = _inputs()
    with torch.no_grad():
        base_ref = ref(x, t * 1000, ctx, return_dict=False)[0]
        one, two = _concept("dancer", 4, seed=2, model=ours), _concept("waves", 2, seed=3, model=ours)
        set_scales(ours, identity=0.7, motion=1.3, concept="dancer")
        set_scales(ours, identity=1.0, motion=0.4, concept="waves")
        want = ours(x, t, ctx)

        # Both concepts in one file, concatenated along the rank, loaded the way diffusers loads a
        # Wan LoRA from the original-name (ComfyUI) layout: its conversion, then load_lora_adapter.
        comfy = export_lora([one, two], "comfyui", identity=[0.7, 1.0], motion=[1.3, 0.4])
        ref.load_lora_adapter(loaders.WanLoraLoaderMixin.lora_state_dict(comfy), prefix="transformer",
                              adapter_name="concepts")
        got = ref(x, t * 1000, ctx, return_dict=False)[0]
    err = (got - want).abs().max().item()
    moved = (want - base_ref).abs().max().item()
    assert moved > 0.05, f"the concepts barely change the output ({moved:.2e}); the test would prove nothing"
    # diffusers' fp32 time embedding vs our float64 one accounts for ~1e-5 (see test_weights_dit).
    print(f"export parity: max abs error {err:.2e}, LoRA moved the output by {moved:.2f}")
    assert err <= 1e-4, f"fp32 max abs error {err:.2e} > 1e-4 (output moved by {moved:.2f} from the base)"
