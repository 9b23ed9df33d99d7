"""T5 / umT5 converters: parity with transformers, Wan layout round trip, full-size key coverage."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS
from model.t5 import T5Encoder
from weights.t5 import convert_t5, t5_config_from_hf, t5_keymap

transformers = pytest.importorskip("transformers")

# attn_implementation="eager": the reference runs its own matmul-softmax path, not the SDPA we use.
SMALL = dict(vocab_size=100, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, dropout_rate=0.0,
             attn_implementation="eager")


def _hf(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "umt5":
        config = transformers.UMT5Config(**SMALL, **extra)
        model = transformers.UMT5EncoderModel(config)
    else:
        config = transformers.T5Config(**SMALL, **extra)
        model = transformers.T5EncoderModel(config)
    with torch.no_grad():  # default init is tiny for some tensors: randomize everything, norms included
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _ours(state: dict, cfg) -> T5Encoder:
    model = T5Encoder(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 2:] = False
    return ids, mask


def _max_err(hf_model, ours: T5Encoder) -> float:
    ids, mask = _inputs()
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out = ours(ids, mask)
    return (ref[mask] - out[mask]).abs().max().item()


def _parity(kind: str, **extra) -> float:
    hf = _hf(kind, **extra)
    cfg = t5_config_from_hf(hf.config.to_dict())
    return _max_err(hf, _ours(convert_t5(hf.state_dict(), "hf", cfg), cfg))


def test_t5_parity_hf():
    err = _parity("t5", feed_forward_proj="gated-gelu")
    assert err <= 1e-5, f"T5 v1.1 fp32 max abs error {err:.2e} > 1e-5"


def test_umt5_parity_hf():
    err = _parity("umt5", feed_forward_proj="gated-gelu")
    assert err <= 1e-5, f"umT5 fp32 max abs error {err:.2e} > 1e-5"


def test_t5_parity_relu():
    err = _parity("t5", feed_forward_proj="relu")
    assert err <= 1e-5, f"original T5 (ReLU) fp32 max abs error {err:.2e} > 1e-5"


def test_config_from_hf():
    cfg = t5_config_from_hf(_hf("umt5").config.to_dict())
    sizes = (cfg.dim, cfg.head_dim, cfg.heads, cfg.ffn_dim, cfg.layers, cfg.vocab_size)
    assert sizes == (32, 8, 4, 64, 2, 100)
    assert cfg.per_layer_position_bias and cfg.ffn == "gated-gelu"
    assert not t5_config_from_hf(_hf("t5").config.to_dict()).per_layer_position_bias
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5_config_from_hf({**_hf("t5").config.to_dict(), "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="model_type"):
        t5_config_from_hf({"model_type": "bert"})


def test_hf_tied_embedding_either_copy():
    hf = _hf("t5", feed_forward_proj="gated-gelu")
    cfg = t5_config_from_hf(hf.config.to_dict())
    sd = hf.state_dict()
    only_shared = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    only_encoder = {k: v for k, v in sd.items() if k != "shared.weight"}
    for state in (only_shared, only_encoder):
        assert torch.equal(convert_t5(state, "hf", cfg)["token_embedding.weight"], sd["shared.weight"])
    untied = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"] + 1}
    with pytest.raises(ValueError, match="differs"):
        convert_t5(untied, "hf", cfg)


def test_convert_reports_bad_keys_and_shapes():
    hf = _hf("umt5")
    cfg = t5_config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    del sd["encoder.block.1.layer.0.SelfAttention.q.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["encoder.final_layer_norm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError) as info:
        convert_t5(sd, "hf", cfg)
    msg = str(info.value)
    assert "missing keys (1): encoder.block.1.layer.0.SelfAttention.q.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "encoder.final_layer_norm.weight -> norm.weight: expected (32,), got (7,)" in msg


def test_convert_ignores_decoder_only_when_asked():
    hf = _hf("umt5")
    cfg = t5_config_from_hf(hf.config.to_dict())
    sd = {**hf.state_dict(), "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected"):
        convert_t5(sd, "hf", cfg)
    assert set(convert_t5(sd, "hf", cfg, ignore_prefixes=("decoder.",))) == set(T5Encoder(cfg).state_dict())


def test_wan_umt5_keymap_roundtrip():
    hf = _hf("umt5")
    cfg = t5_config_from_hf(hf.config.to_dict())
    from_hf = convert_t5(hf.state_dict(), "hf", cfg)
    to_wan = {ours: wan for wan, ours in t5_keymap(cfg, "wan").items()}
    wan_sd = {to_wan[k]: v.clone() for k, v in from_hf.items()}
    assert "blocks.0.ffn.gate.0.weight" in wan_sd and "blocks.1.pos_embedding.embedding.weight" in wan_sd
    from_wan = convert_t5(wan_sd, "wan", cfg)
    assert from_wan.keys() == from_hf.keys()
    assert all(torch.equal(from_wan[k], from_hf[k]) for k in from_hf)
    err = _max_err(hf, _ours(from_wan, cfg))
    assert err <= 1e-5, f"Wan-layout umT5 fp32 max abs error {err:.2e} > 1e-5"


@pytest.mark.parametrize("source", ["hf", "wan"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_keymap_covers_our_model_exactly(source, per_layer):
    import dataclasses

    cfg = dataclasses.replace(PRESETS["tiny"].t5, per_layer_position_bias=per_layer)
    keymap = t5_keymap(cfg, source)
    assert len(set(keymap.values())) == len(keymap)  # one source key per key of ours
    assert set(keymap.values()) == set(T5Encoder(cfg).state_dict())


def test_umt5_xxl_key_coverage_meta():
    cfg = PRESETS["wan2.1-1.3b"].t5
    hf_config = transformers.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                                        num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu")
    assert t5_config_from_hf(hf_config.to_dict(), max_length=cfg.max_length) == cfg
    with torch.device("meta"):
        hf = transformers.UMT5EncoderModel(hf_config)
        ours = T5Encoder(cfg)
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    converted = convert_t5(hf_sd, "hf", cfg)  # raises on any missing / unexpected key or shape mismatch
    keymap = t5_keymap(cfg, "hf")
    assert set(hf_sd) - set(keymap) == {"encoder.embed_tokens.weight"}  # the tied duplicate of shared.weight
    assert converted.keys() == our_sd.keys()
    assert all(converted[k].shape == our_sd[k].shape for k in our_sd)
    assert len(our_sd) == 2 + 24 * 10  # embedding, final norm; per block q k v o, 2 norms, 3 ffn, bias
