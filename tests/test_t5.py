"""T5 / umT5 encoder: relative position buckets, masking, embedding resize, precision."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import PRESETS, T5Config
from model.t5 import RMSNorm, T5Encoder, relative_position_bucket

CFG = T5Config(vocab_size=64, dim=32, head_dim=8, heads=4, ffn_dim=48, layers=2, max_length=16)


def _model(seed: int = 0, **changes) -> T5Encoder:
    torch.manual_seed(seed)
    model = T5Encoder(dataclasses.replace(CFG, **changes)).eval()
    with torch.no_grad():  # a random bias table, so the position bias actually matters
        for name, p in model.named_parameters():
            if "pos_embedding" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-400, 401)[None, :]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                max_distance=max_distance)
    ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                    max_distance=max_distance)
    assert torch.equal(ours, ref)
    assert ours.min() >= 0 and ours.max() < num_buckets


def test_relative_bucket_convention_key_minus_query():
    # Keys after the query (positive key - query) use the upper half of the buckets.
    assert relative_position_bucket(torch.tensor([3])).item() == 16 + 3
    assert relative_position_bucket(torch.tensor([-3])).item() == 3


@pytest.mark.parametrize("per_layer", [False, True])
def test_padding_does_not_change_real_positions(per_layer):
    model = _model(per_layer_position_bias=per_layer)
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 3:] = False
    other = ids.clone()
    other[~mask] = torch.randint(0, CFG.vocab_size, (int((~mask).sum()),))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
        unmasked = model(other, torch.ones_like(mask))
    assert torch.allclose(a[mask], b[mask], atol=1e-6), (a - b)[mask].abs().max()
    assert not torch.allclose(a[mask], unmasked[mask], atol=1e-3)  # the mask really is applied


def test_padded_outputs_are_zero():
    model = _model()
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        out = model(ids, mask)
    assert out.shape == (1, 8, CFG.dim)
    assert torch.all(out[0, 5:] == 0) and out[0, :5].abs().sum() > 0


def test_fully_padded_row_stays_finite():
    with torch.no_grad():
        out = _model()(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_position_bias_placement():
    t5_keys = set(T5Encoder(CFG).state_dict())
    umt5_keys = set(T5Encoder(dataclasses.replace(CFG, per_layer_position_bias=True)).state_dict())
    assert [k for k in t5_keys if "pos_embedding" in k] == ["pos_embedding.embedding.weight"]
    assert sorted(k for k in umt5_keys if "pos_embedding" in k) == [
        f"blocks.{i}.pos_embedding.embedding.weight" for i in range(CFG.layers)]


def test_position_bias_changes_output():
    # Same tokens in another order give different outputs only through the position bias.
    model = _model()
    ids = torch.tensor([[5, 5, 5, 9]])
    with torch.no_grad():
        out = model(ids)
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)


def test_abs_pos_starts_silent_and_trains_only_real_positions():
    plain, with_abs = _model(), _model(abs_pos=True)
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    with torch.no_grad():  # zero init: the same seed builds the same function
        assert torch.equal(plain(ids, mask), with_abs(ids, mask))
    with_abs(ids, mask).square().sum().backward()
    grad = with_abs.abs_pos.grad.abs().sum(-1)
    assert (grad[:6] > 0).all()  # every real position learns ...
    assert (grad[6:] == 0).all()  # ... and padded or unused positions stay at zero


def test_abs_pos_tells_repeated_words_apart_where_relative_bias_cannot():
    # In a run of one word every value vector is the same, and a position bias only reweights values:
    # each position gets the same output. Only an absolute position separates them.
    plain, with_abs = _model(), _model(abs_pos=True)
    with torch.no_grad():
        with_abs.abs_pos.normal_()
        ids = torch.full((1, CFG.max_length), 7)
        a, b = plain(ids)[0], with_abs(ids)[0]
    assert torch.allclose(a[6], a[9], atol=1e-5)
    assert not torch.allclose(b[6], b[9], atol=1e-3)


def test_abs_pos_rejects_prompts_longer_than_its_table():
    with pytest.raises(ValueError, match="absolute positions"):
        _model(abs_pos=True)(torch.zeros(1, CFG.max_length + 1, dtype=torch.long))


def test_resize_adds_zero_rows_and_keeps_old():
    model = _model()
    old = model.token_embedding.weight.detach().clone()
    model.resize_token_embeddings(CFG.vocab_size + 3)
    w = model.token_embedding.weight
    assert w.shape == (CFG.vocab_size + 3, CFG.dim) and model.cfg.vocab_size == CFG.vocab_size + 3
    assert torch.equal(w[: CFG.vocab_size], old)
    assert torch.all(w[CFG.vocab_size:] == 0)
    assert w.requires_grad
    with torch.no_grad():  # the new ids are usable
        assert model(torch.tensor([[CFG.vocab_size + 2, 1]])).shape == (1, 2, CFG.dim)


def test_resize_rejects_shrinking():
    with pytest.raises(ValueError, match="cannot shrink"):
        _model().resize_token_embeddings(CFG.vocab_size - 1)


def test_rmsnorm_has_no_mean_subtraction():
    x = torch.full((1, 8), 3.0)
    assert torch.allclose(RMSNorm(8)(x), torch.ones(1, 8), atol=1e-5)  # a LayerNorm would give zeros


def test_bf16_forward_tracks_fp32():
    model = _model()
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    with torch.no_grad():
        ref = model(ids)
        out = model.to(torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err < 0.1, f"bf16 vs fp32 max abs error {err} >= 0.1"


def test_relu_ffn_variant_has_no_gate():
    keys = set(T5Encoder(dataclasses.replace(CFG, ffn="relu")).state_dict())
    assert "blocks.0.ffn.fc1.weight" in keys and not any("gate" in k for k in keys)


def test_presets_build_on_meta():
    for preset in PRESETS.values():
        with torch.device("meta"):
            model = T5Encoder(preset.t5)
        assert model.token_embedding.weight.shape == (preset.t5.vocab_size, preset.t5.dim)


@pytest.mark.parametrize("changes", [{"rel_buckets": 3}, {"ffn": "swiglu"}, {"dim": 0}])
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **changes)


def test_added_token_rows_start_at_zero_and_train(sp_model_path):
    from model.tokenizer import Tokenizer

    rows = Tokenizer(sp_model_path).sp_size + 10  # an embedding table larger than the sp vocab, as umT5's
    tok = Tokenizer(sp_model_path, first_added_id=rows)  # new ids after the table
    v, u = tok.add_tokens(["[v]", "[u]"])
    model = _model(vocab_size=rows)
    model.resize_token_embeddings(tok.vocab_size)
    ids, mask = tok.encode(["a [v] square in [u] motion"], CFG.max_length)
    model(ids, mask).pow(2).sum().backward()
    grad = model.token_embedding.weight.grad
    assert torch.all(model.token_embedding.weight[[v, u]] == 0)
    assert grad[v].abs().sum() > 0 and grad[u].abs().sum() > 0
