"""The Set-and-Sequence LoRA layer and its injection (lora/layers.py, lora/inject.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora.inject import (
    DEFAULT_TARGETS,
    concept_adapters,
    concept_state_dict,
    inject_lora,
    merge_lora,
    set_scales,
    set_stage,
    unmerge_lora,
)
from lora.layers import ConceptAdapter, LoRALinear

D, TEXT, FFN = 16, 8, 32


class _Attn(nn.Module):
    def __init__(self, kv_dim: int):
        super().__init__()
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.k, self.v = nn.Linear(kv_dim, D), nn.Linear(kv_dim, D)
        self.norm_q = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.norm_q(self.q(x)) @ self.k(ctx).transpose(1, 2) / D**0.5, dim=-1)
        return self.o(w @ self.v(ctx))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.cross_attn = _Attn(D), _Attn(TEXT)
        self.norm3 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, D))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x, x)
        x = x + self.cross_attn(self.norm3(x), ctx)
        return x + self.ffn(x)


class TinyNet(nn.Module):
    """Stand-in with our DiT's module names (blocks.{i}.self_attn.q, ..., ffn.0/2, head.head)."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return self.head.head(x)


def _net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, D, generator=g), torch.randn(2, 3, TEXT, generator=g)


def _randomize_lora(model: nn.Module, concept: str | None = None, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in concept_state_dict(model, concept).values():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))


def _train(model: nn.Module, steps: int = 3, seed: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            betas=(0.9, 0.99), weight_decay=0.01)
    x, ctx = _inputs(seed)
    model.train()
    for _ in range(steps):
        loss = model(x, ctx).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_injection_wraps_exactly_the_default_targets():
    model = _net()
    hits = inject_lora(model, DEFAULT_TARGETS, rank=4)
    expected = [f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    expected += [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    assert sorted(hits) == sorted(expected)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in expected)
    assert type(model.head.head) is nn.Linear
    lora = [p for k, p in model.named_parameters() if ".adapters." in k]
    assert len(lora) == 3 * len(expected) and not any(p.requires_grad for p in lora)  # frozen until a stage


def test_base_state_dict_keys_and_tensors_unchanged_by_injection():
    model = _net()
    before = _snapshot(model)
    weight = model.blocks[0].self_attn.q.weight
    inject_lora(model, rank=4)
    after = model.state_dict()
    base_keys = [k for k in after if ".adapters." not in k]
    assert base_keys == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.blocks[0].self_attn.q.weight is weight  # shared, not copied
    assert all(k.endswith((".lora_A1", ".lora_B1", ".lora_B2")) for k in after if ".adapters." in k)
    # The base checkpoint still loads strictly into the injected model's base part.
    missing, unexpected = model.load_state_dict(before, strict=False)
    assert unexpected == [] and all(".adapters." in k for k in missing)


def test_fresh_adapter_is_a_noop_bitwise():
    model = _net()
    x, ctx = _inputs()
    ref = model(x, ctx)
    inject_lora(model, rank=4)
    for mode in (model.eval, model.train):
        mode()
        set_stage(model, 1)
        assert torch.equal(model(x, ctx), ref)


def test_parameter_shapes_follow_torch_orientation():
    model = _net()
    inject_lora(model, rank=3)
    adapter = model.blocks[0].cross_attn.k.adapters["concept"]
    assert adapter.lora_A1.shape == (3, TEXT)  # (r, in)
    assert adapter.lora_B1.shape == adapter.lora_B2.shape == (D, 3)  # (out, r)
    assert adapter.lora_A1.abs().sum() > 0 and adapter.lora_B1.abs().sum() == 0


def test_forward_adds_scaled_delta():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(6, 5))
    adapter = layer.add_adapter("c", rank=2)
    _randomize_lora(layer)
    adapter.alpha, adapter.beta = 0.7, -1.3
    x = torch.randn(4, 6)
    delta = (0.7 * adapter.lora_B1 + -1.3 * adapter.lora_B2) @ adapter.lora_A1
    torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T + layer.bias, rtol=0, atol=1e-6)


def test_merged_equals_unmerged_and_unmerge_restores_weight():
    model = _net()
    inject_lora(model, rank=4)
    _randomize_lora(model)
    set_scales(model, identity=0.8, motion=1.5)
    model.eval()
    x, ctx = _inputs()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    unmerged = model(x, ctx)
    merge_lora(model)
    assert not torch.equal(model.blocks[0].self_attn.q.weight, weights["blocks.0.self_attn.q"])
    torch.testing.assert_close(model(x, ctx), unmerged, rtol=0, atol=1e-5)  # tolerance 1e-5
    unmerge_lora(model)
    for name, w in weights.items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, ctx), unmerged, rtol=0, atol=1e-6)


def test_merge_is_explicit_and_training_a_merged_lora_is_refused():
    model = _net()
    inject_lora(model, rank=4)
    _randomize_lora(model)
    w = model.blocks[0].ffn[0].weight.detach().clone()
    model.eval()
    model.train()
    assert torch.equal(model.blocks[0].ffn[0].weight, w)  # train()/eval() never merge
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        set_stage(model, 2)
    model.blocks[0].ffn[0].adapters["concept"].lora_B2.requires_grad_(True)
    with pytest.raises(RuntimeError, match="unmerge"):
        model(*_inputs())
    with pytest.raises(RuntimeError, match="unmerge"):
        set_scales(model, identity=0.5)


def test_b_mask_acts_in_training_and_not_in_eval():
    model = _net()
    inject_lora(model, rank=4)
    _randomize_lora(model)
    set_stage(model, 1)
    x, ctx = _inputs()
    model.eval()
    e1, e2 = model(x, ctx), model(x, ctx)
    assert torch.equal(e1, e2)
    model.train()
    torch.manual_seed(0)
    t1 = model(x, ctx)
    t2 = model(x, ctx)
    assert not torch.allclose(t1, e1, atol=1e-4) and not torch.allclose(t1, t2, atol=1e-4)
    set_stage(model, 0)  # nothing trained: nothing masked, training output equals eval output
    assert torch.equal(model(x, ctx), e1)


def test_b_mask_only_on_the_trained_b():
    model = _net()
    inject_lora(model, rank=4)
    _randomize_lora(model)
    with torch.no_grad():
        for adapter in concept_adapters(model).values():
            adapter.lora_B2.zero_()
    set_stage(model, 2)  # B2 (zero) is trained and masked; the nonzero B1 is frozen and must not be
    x, ctx = _inputs()
    model.eval()
    ref = model(x, ctx)
    model.train()
    assert torch.equal(model(x, ctx), ref)


@pytest.mark.parametrize("p", [0.8, 0.5])
def test_b_mask_drop_rate_matches_p(p):
    torch.manual_seed(0)
    adapter = ConceptAdapter(in_features=8, out_features=256, rank=64)  # 16384 mask entries
    with torch.no_grad():
        adapter.lora_B1.fill_(1.0)
    adapter.lora_B2.requires_grad_(False)
    adapter.dropout, adapter.beta = p, 0.0
    adapter.train()
    masked = adapter.coefficients().detach()
    n = masked.numel()
    drop = (masked == 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(drop - p) < 5 * sigma, f"drop rate {drop:.4f} vs p={p} (5 sigma = {5 * sigma:.4f})"
    kept = masked[masked != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))  # inverted-dropout scaling


def test_stage_trainable_sets_are_disjoint_and_base_frozen():
    model = _net()
    inject_lora(model, rank=4)
    s1 = set(set_stage(model, 1))
    s2 = set(set_stage(model, 2))
    assert s1 and s2 and not s1 & s2
    assert all(k.endswith((".lora_A1", ".lora_B1")) for k in s1)
    assert all(k.endswith(".lora_B2") for k in s2)
    for stage, names in ((1, s1), (2, s2)):
        set_stage(model, stage)
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        assert trainable == names
    assert set_stage(model, 0) == []
    assert not any(p.requires_grad for p in model.parameters())


def test_stage_dropout_defaults_to_the_papers_p():
    model = _net()
    inject_lora(model, rank=4)
    set_stage(model, 1)
    assert {a.dropout for a in concept_adapters(model).values()} == {0.8}
    set_stage(model, 2)
    assert {a.dropout for a in concept_adapters(model).values()} == {0.5}
    set_stage(model, 2, dropout=0.1)
    assert {a.dropout for a in concept_adapters(model).values()} == {0.1}


def test_stage2_changes_no_stage1_tensor():
    model = _net()
    inject_lora(model, rank=4)
    set_stage(model, 1)
    _train(model)
    before = _snapshot(model)
    set_stage(model, 2)
    _train(model, seed=4)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(".lora_B2"):
            continue
        assert torch.equal(after[key], value), f"stage 2 changed {key}"
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith(".lora_B2"))


def test_stage1_changes_only_a1_and_b1():
    model = _net()
    inject_lora(model, rank=4)
    before = _snapshot(model)
    set_stage(model, 1)
    _train(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith((".lora_A1", ".lora_B1")) for k in changed)


def test_zero_scales_reproduce_the_base():
    model = _net()
    x, ctx = _inputs()
    ref = model(x, ctx)
    inject_lora(model, rank=4)
    _randomize_lora(model)
    assert not torch.allclose(model(x, ctx), ref, atol=1e-4)
    set_scales(model, identity=0.0, motion=0.0)
    assert torch.equal(model(x, ctx), ref)


def test_identity_and_motion_scales_act_separately():
    model = _net()
    inject_lora(model, rank=4)
    _randomize_lora(model)
    layer = model.blocks[1].self_attn.v
    adapter = layer.adapters["concept"]
    set_scales(model, identity=1.0, motion=0.0)
    torch.testing.assert_close(layer.delta_weight(), adapter.lora_B1 @ adapter.lora_A1)
    set_scales(model, identity=0.0, motion=2.0)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * adapter.lora_B2 @ adapter.lora_A1)


def test_two_concepts_do_not_disturb_each_other():
    model = _net()
    x, ctx = _inputs()
    inject_lora(model, rank=4, name="dancer")
    set_stage(model, 1)
    _train(model)
    dancer = {k: v.clone() for k, v in concept_state_dict(model, "dancer").items()}
    inject_lora(model, rank=3, name="waves")
    set_stage(model, 1, concepts=["waves"])
    _train(model, seed=5)
    set_stage(model, 2, concepts=["waves"])
    _train(model, seed=6)
    for k, v in concept_state_dict(model, "dancer").items():
        assert torch.equal(v, dancer[k]), f"training 'waves' changed dancer's {k}"
    waves = concept_state_dict(model, "waves")
    assert any(v.abs().sum() > 0 for k, v in waves.items() if k.endswith("lora_B2"))
    # The forward sums the two deltas: equal to a model holding the summed weight update.
    model.eval()
    out = model(x, ctx)
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        assert set(layer.adapters) == {"dancer", "waves"}
    merge_lora(model)
    torch.testing.assert_close(model(x, ctx), out, rtol=0, atol=1e-5)


def test_adding_a_concept_name_twice_is_refused():
    model = _net()
    inject_lora(model, rank=4, name="dancer")
    with pytest.raises(ValueError, match="already holds a concept named 'dancer'"):
        inject_lora(model, rank=4, name="dancer")


def test_target_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match=r"matches no module"):
        inject_lora(_net(), [r"blocks\.\d+\.attn1\.to_q"], rank=4)


def test_target_that_matches_a_non_linear_is_refused():
    with pytest.raises(ValueError, match="LayerNorm"):
        inject_lora(_net(), [r"blocks\.\d+\.self_attn\.(q|norm_q)"], rank=4)


def test_patterns_are_anchored():
    model = _net()
    with pytest.raises(ValueError, match="matches no module"):
        inject_lora(model, [r"self_attn\.q"], rank=2)  # not blocks.0.self_attn.q: fullmatch
    hits = inject_lora(model, [r"blocks\.1\.ffn\.0"], rank=2)
    assert hits == ["blocks.1.ffn.0"]


def _tiny_dit():
    from model.config import get_preset
    from model.dit import DiT

    torch.manual_seed(0)
    dit = DiT(get_preset("tiny").dit)
    with torch.no_grad():  # break the zero inits (head, self-cond) so outputs depend on every layer
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return dit.eval()


def test_real_tiny_dit_injection_is_a_noop_and_keeps_keys():
    dit = _tiny_dit()
    cfg = dit.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    t = torch.tensor([0.3])
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    keys = list(dit.state_dict())
    ref = dit(x, t, ctx)
    hits = inject_lora(dit, rank=4)
    assert len(hits) == cfg.layers * 10  # 8 attention projections + 2 MLP linears per block
    assert [k for k in dit.state_dict() if ".adapters." not in k] == keys
    assert torch.equal(dit(x, t, ctx), ref)
    _randomize_lora(dit)
    out = dit(x, t, ctx)
    assert not torch.allclose(out, ref, atol=1e-4)
    merge_lora(dit)
    torch.testing.assert_close(dit(x, t, ctx), out, rtol=0, atol=1e-5)  # tolerance 1e-5


def test_mask_is_the_same_when_gradient_checkpointing_recomputes():
    dit = _tiny_dit()
    inject_lora(dit, rank=4)
    _randomize_lora(dit)
    set_stage(dit, 1)
    dit.train()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, dit.cfg.in_channels, 2, 4, 4, generator=g), torch.randn(1, 5, 64, generator=g)
    grads = []
    for checkpointing in (False, True):
        dit.gradient_checkpointing = checkpointing
        dit.zero_grad()
        torch.manual_seed(7)
        dit(x, torch.tensor([0.5]), ctx).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in dit.named_parameters() if p.requires_grad})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-7)


def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(32, 16).to(torch.bfloat16))
    adapter = layer.add_adapter("c", rank=4)
    assert adapter.lora_A1.dtype == torch.float32
    _randomize_lora(layer)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=2e-2, atol=2e-2)  # bf16 rounding of the merged weight
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w, rtol=1e-2, atol=1e-2)
