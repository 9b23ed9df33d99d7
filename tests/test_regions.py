"""Regional concepts (lora/regions.py): token weights of a box against brute force, the weighted LoRA
forward against its formula, which layers are confined, and the block restoring every layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lora.inject import inject_lora, lora_layers, merge_lora
from lora.layers import LoRALinear
from lora.regions import box_weights, check_box, regions, word_mask
from model.config import PRESETS
from model.dit import Attention, DiT

CFG = dataclasses.replace(PRESETS["tiny"].dit, dim=32, heads=2, layers=2, ffn_dim=64, rope_split=(6, 4, 6))


def two_concept_layer(seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear.from_linear(torch.nn.Linear(6, 5))
    for name in ("a", "b"):
        adapter = layer.add_adapter(name, rank=3)
        torch.nn.init.normal_(adapter.lora_B1)
        torch.nn.init.normal_(adapter.lora_B2)
    return layer


def dit_with_concepts() -> DiT:
    torch.manual_seed(0)
    dit = DiT(CFG)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)
    for name in ("a", "b"):
        inject_lora(dit, rank=2, name=name)
    for layer in lora_layers(dit).values():
        for adapter in layer.adapters.values():
            torch.nn.init.normal_(adapter.lora_B1, std=0.1)
    return dit.eval()


@pytest.mark.parametrize("box,grid", [((0, 0, 0.5, 1), (2, 4, 4)), ((0.2, 0.1, 0.9, 0.6), (3, 5, 7)),
                                      ((0, 0, 1, 1), (1, 3, 2)), ((0.5, 0.5, 1, 1), (2, 2, 2))])
def test_box_weights_mark_the_tokens_whose_centre_is_inside(box, grid):
    t, h, w = grid
    want = [float(box[0] <= (j + 0.5) / w < box[2] and box[1] <= (i + 0.5) / h < box[3])
            for _ in range(t) for i in range(h) for j in range(w)]
    assert box_weights(box, grid).tolist() == want


@pytest.mark.parametrize("box,message", [((0, 0, 0.5), "4 numbers"), ((0.5, 0, 0.5, 1), "0 <= x0 < x1"),
                                         ((0, -0.1, 1, 1), "not inside the frame")])
def test_a_bad_box_is_refused_naming_the_rule(box, message):
    with pytest.raises(ValueError, match=message):
        check_box(box)


def test_a_box_between_token_centres_is_refused():
    with pytest.raises(ValueError, match="holds no token centre"):
        box_weights((0.0, 0.0, 0.1, 1.0), (1, 4, 4))


def test_each_concepts_output_is_weighted_per_token():
    layer, x = two_concept_layer(), torch.randn(2, 4, 6)
    wa, wb = torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 1.0, 0.25])
    layer.regions = {"a": wa, "b": wb}
    got = layer(x)
    base = F.linear(x, layer.weight, layer.bias)
    da = x @ layer.adapters["a"].delta_weight().T
    db = x @ layer.adapters["b"].delta_weight().T
    torch.testing.assert_close(got, base + wa[:, None] * da + wb[:, None] * db, rtol=1e-5, atol=1e-5)
    outside = wa == 0  # token 1 carries only b
    layer.regions = {"a": wa}
    only_b = base + db
    torch.testing.assert_close(layer(x)[:, outside], only_b[:, outside], rtol=1e-5, atol=1e-5)


def test_a_token_outside_every_region_gets_the_base_layer_exactly():
    layer, x = two_concept_layer(), torch.randn(1, 3, 6)
    layer.regions = {"a": torch.tensor([0.0, 1.0, 0.0]), "b": torch.tensor([0.0, 0.0, 1.0])}
    assert torch.equal(layer(x)[:, 0], F.linear(x, layer.weight, layer.bias)[:, 0])


def test_a_region_made_for_another_size_is_refused():
    layer = two_concept_layer()
    layer.regions = {"a": torch.ones(5)}
    with pytest.raises(ValueError, match="made for another video size"):
        layer(torch.randn(1, 3, 6))


def test_the_block_confines_video_layers_only_and_restores_every_layer():
    dit = dit_with_concepts()
    w = torch.ones(8)
    with regions(dit, {"a": w}):
        layers = lora_layers(dit)
        assert layers["blocks.0.cross_attn.k"].regions is None  # reads text: no place in the frame
        assert layers["blocks.0.cross_attn.v"].regions is None
        assert set(layers["blocks.0.cross_attn.q"].regions) == {"a"}
        assert set(layers["blocks.1.self_attn.o"].regions) == {"a"}
    assert all(layer.regions is None for layer in lora_layers(dit).values())
    with pytest.raises(KeyError), regions(dit, {"b": w}):
        raise KeyError("boom")
    assert all(layer.regions is None for layer in lora_layers(dit).values())


def test_the_whole_frame_changes_nothing_and_half_of_it_does():
    dit = dit_with_concepts()
    x, t, ctx = torch.randn(1, CFG.in_channels, 2, 4, 4), torch.tensor([0.7]), torch.randn(1, 3, CFG.text_dim)
    grid = (2, 2, 2)
    with torch.no_grad():
        free = dit(x, t, ctx)
        with regions(dit, {"a": box_weights((0, 0, 1, 1), grid), "b": box_weights((0, 0, 1, 1), grid)}):
            whole = dit(x, t, ctx)
        with regions(dit, {"a": box_weights((0, 0, 0.5, 1), grid), "b": box_weights((0.5, 0, 1, 1), grid)}):
            halves = dit(x, t, ctx)
    assert torch.equal(whole, free)
    assert (halves - free).abs().max() > 1e-4


def test_unknown_concepts_and_merged_layers_are_refused():
    dit = dit_with_concepts()
    held = r"does not hold; it holds \['a', 'b'\]"
    with pytest.raises(ValueError, match=held), regions(dit, {"c": torch.ones(8)}):
        pass
    merge_lora(dit)
    with pytest.raises(RuntimeError, match="merged"), regions(dit, {"a": torch.ones(8)}):
        pass


def test_word_mask_hides_a_concepts_words_outside_its_region_only():
    weights = {"a": torch.tensor([1.0, 0.0, 0.5]), "b": torch.tensor([0.0, 1.0, 1.0])}
    positions = {"a": torch.tensor([0, 1, 0, 0]).bool(), "b": torch.tensor([0, 0, 0, 1]).bool()}
    got = word_mask(weights, positions)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            hidden = any(weights[c][i] <= 0 and positions[c][j] for c in "ab")
            assert bool(got[i, j]) is not hidden, (i, j)


def test_a_key_mask_equals_attention_without_those_keys():
    torch.manual_seed(0)
    attn = Attention(CFG, kv_dim=CFG.dim).eval()
    x, ctx = torch.randn(1, 3, CFG.dim), torch.randn(1, 5, CFG.dim)
    attn.key_mask = torch.tensor([[True] * 5, [True, False, True, True, False], [True] * 5])
    with torch.no_grad():
        got = attn(x, ctx)
        attn.key_mask = None
        keep = [0, 2, 3]
        alone = attn(x[:, 1:2], ctx[:, keep])  # query 1 with only the keys it may read
        free = attn(x, ctx)
    torch.testing.assert_close(got[:, 1:2], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 0::2], free[:, 0::2], rtol=1e-5, atol=1e-6)


def test_the_block_confines_a_concepts_words_when_told_where_they_are():
    dit = dit_with_concepts()
    cross = [m for name, m in dit.named_modules() if name.endswith("cross_attn")]
    left = box_weights((0, 0, 0.5, 1), (2, 2, 2))
    with regions(dit, {"a": left}):
        assert all(m.key_mask is None for m in cross)  # no positions: only the adapters are confined
    words = {"a": torch.tensor([False, True, False])}
    with regions(dit, {"a": left}, words):
        assert all(torch.equal(m.key_mask, word_mask({"a": left}, words)) for m in cross)
    assert all(m.key_mask is None for m in cross)
