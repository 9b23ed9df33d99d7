"""fp8 base weights (model/fp8.py): tile quantization, a Wan-shaped DiT's forward within a stated bound of
fp32, LoRA training on top, half the bytes of bf16, and the `setseq convert --dtype fp8` round trip."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from lora.concept import base_fingerprint
from lora.inject import inject_lora, remove_concept, set_stage
from lora.layers import LoRALinear
from model import fp8 as F8
from model.config import PRESETS
from model.dit import DiT
from setseq.cli import main as cli_main
from weights.base import check_memory_options, load_base
from weights.checkpoint import load_checkpoint, save_part
from weights.io import read_safetensors, read_safetensors_header, write_safetensors_atomic
from weights.load import load_into

pytestmark = pytest.mark.skipif(F8.FP8 is None, reason="this torch has no float8_e4m3fn")

# Wan 2.1's layout at 256 wide: every linear a whole number of 128 x 128 tiles, as at real sizes.
WAN = dataclasses.replace(PRESETS["wan2.1-1.3b"].dit, dim=256, heads=2, layers=2, ffn_dim=512, text_dim=64)
# Relative L2 error of the velocity, measured on `trained_like` models (seeds 0-3, text_dim 64 and 4096):
# fp8 block linears vs fp32 0.019-0.024 (the same vs a bf16 model); the block linears rounded to bf16
# instead: 0.0012-0.0014, ~16x less, as e4m3's 3 mantissa bits vs bf16's 7 predict. ~1.5x room.
FORWARD_BOUND = 0.035


def trained_like(cfg=WAN, seed: int = 0) -> DiT:
    """A DiT with heavy-tailed (Student-t) weights of fan-in scale, and noise on every other tensor (its
    zero-initialized ones, e.g. the head, would hide errors)."""
    torch.manual_seed(seed)
    dit = DiT(cfg)
    t = torch.distributions.StudentT(4.0)  # variance 2
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim >= 2 and "modulation" not in name:
                p.copy_(t.sample(p.shape) * 0.7 / p[0].numel() ** 0.5)
            else:
                p.add_(t.sample(p.shape) * 0.02)
    return dit.eval()


def inputs(cfg=WAN, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 7, cfg.text_dim, generator=g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tiles_scale_by_powers_of_two_and_round_within_e4m3s_step():
    w = torch.distributions.StudentT(3.0).sample((40, 50)) * torch.logspace(-3, 1, 50)  # columns of 4 decades
    w8, scale = F8.quantize(w, block=16)  # ragged: 40 x 50 is not a whole number of tiles
    assert w8.dtype == F8.FP8 and scale.shape == (3, 4)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    back = F8.dequantize(w8, scale, 16, torch.float32)
    expanded = F8._expand(scale, w.shape, 16)
    normal = w.abs() >= expanded * 2**-6  # e4m3's normal range below the tile's scale
    assert ((back - w).abs() <= w.abs() * 2**-4 + 1e-30)[normal].all()  # half a step of a 3-bit mantissa
    assert (w.abs() / expanded).max() <= F8.E4M3_MAX
    zero = torch.zeros(20, 20)
    z8, zs = F8.quantize(zero, block=16)
    assert torch.equal(F8.dequantize(z8, zs, 16, torch.float32), zero) and torch.equal(zs, torch.ones(2, 2))


def test_dequantization_is_exact_in_bf16_and_fp32():
    w8, scale = F8.quantize(torch.randn(256, 384))
    assert torch.equal(F8.dequantize(w8, scale, 128, torch.bfloat16),
                       F8.dequantize(w8, scale, 128, torch.float32).bfloat16())


@torch.no_grad()
def test_fp8_dit_reproduces_the_fp32_forward_within_the_stated_bound():
    dit = trained_like()
    x, t, c = inputs()
    ref = dit(x, t, c)
    bf16 = copy.deepcopy(dit)
    for name in F8.fp8_target_names(bf16):
        w = bf16.get_submodule(name).weight
        w.copy_(w.bfloat16().float())
    q = copy.deepcopy(dit)
    names = F8.quantize_linears(q)
    assert len(names) == 10 * WAN.layers and all(isinstance(q.get_submodule(n), F8.FP8Linear) for n in names)
    # norms, embeddings, modulation, time MLP and head keep their dtype
    assert {p.dtype for n, p in q.named_parameters() if not any(n.startswith(k + ".") for k in names)} \
        == {torch.float32}
    err_fp8, err_bf16 = rel(q(x, t, c), ref), rel(bf16(x, t, c), ref)
    assert err_fp8 < FORWARD_BOUND, err_fp8
    assert err_bf16 < err_fp8 / 5  # the bound is fp8's own rounding, not a broken layer
    # the fp8 model IS the fp32 model with dequantized weights, bit for bit
    for name in names:
        dit.get_submodule(name).weight.copy_(q.get_submodule(name).dequantized())
    assert torch.equal(q(x, t, c), dit(x, t, c))


def test_linear_weight_bytes_halve_against_bf16_in_memory_and_in_the_file(tmp_path):
    dit = trained_like()
    bf16 = copy.deepcopy(dit).to(torch.bfloat16)
    q = copy.deepcopy(bf16)
    F8.quantize_linears(q)
    ratio = F8.linear_weight_bytes(q) / F8.linear_weight_bytes(bf16)
    assert 0.5 < ratio < 0.5005, ratio  # + 4 bytes of scale per 128 x 128 tile
    for folder, model in (("a", bf16), ("b", q)):
        (tmp_path / folder).mkdir()
        save_part(tmp_path / folder, "dit", model)
    names = set(F8.fp8_target_names(dit))
    width = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    sizes = []
    for folder in ("a", "b"):
        entries, _ = read_safetensors_header(tmp_path / folder / "dit.safetensors")
        sizes.append(sum(width[d] * torch.Size(s).numel() for k, (d, s) in entries.items()
                         if k.rpartition(".")[0] in names and not k.endswith(".bias")))
    assert 0.5 < sizes[1] / sizes[0] < 0.5005
    loaded = load_into(lambda: DiT(WAN), read_safetensors(tmp_path / "b" / "dit.safetensors"), torch.bfloat16)
    for name in names:
        layer, want = loaded.get_submodule(name), q.get_submodule(name)
        assert isinstance(layer, F8.FP8Linear) and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.dequantized(), want.dequantized())


def test_lora_trains_on_fp8_weights_and_only_the_adapters_get_gradients():
    dit = trained_like()
    F8.quantize_linears(dit)
    dit.requires_grad_(False)
    fingerprint = base_fingerprint(dit)
    torch.manual_seed(2)
    inject_lora(dit, rank=4, name="c")
    layer = dit.blocks[0].self_attn.q
    assert isinstance(layer, LoRALinear) and layer.fp8 and layer.weight.dtype == F8.FP8
    assert torch.equal(layer.base_norm(), F8.dequantize(layer.weight, layer.weight_scale, 128, torch.float32)
                       .norm())  # what AdapterGrowth divides by: the real weight's norm, not the fp8 codes
    trained = set_stage(dit, 1, dropout=0.0)
    dit.train()
    x, t, c = inputs()
    opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = dit(x, t, c).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    grads = {n: p.grad for n, p in dit.named_parameters() if p.grad is not None}
    assert set(grads) == set(trained) and all(".adapters.c." in n for n in grads)
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith("lora_A1"))
    assert all(p.dtype == torch.float32 for n, p in dit.named_parameters() if ".adapters." in n)
    assert all(p.grad is None and not p.requires_grad for p in dit.parameters() if p.dtype == F8.FP8)
    assert losses[-1] < losses[0]
    with pytest.raises(RuntimeError, match="fp8"):
        layer.merge()
    remove_concept(dit, "c")  # back to FP8Linear, sharing the same fp8 tensors
    assert type(dit.blocks[0].self_attn.q) is F8.FP8Linear and base_fingerprint(dit) == fingerprint


def test_fp8_checkpoint_without_scales_is_refused(tmp_path):
    q = trained_like()
    F8.quantize_linears(q)
    state = q.state_dict()
    del state["blocks.0.ffn.0.weight_scale"]
    with pytest.raises(ValueError, match=r"fp8 tensors without a `weight_scale`.*blocks\.0\.ffn\.0\.weight"):
        load_into(lambda: DiT(WAN), state)


def test_load_base_fp8_quantizes_the_block_linears_and_keeps_the_fingerprint():
    plain = load_base("tiny", device="cpu")  # the committed, trained tiny base
    fp8 = load_base("tiny", device="cpu", base_dtype="fp8")
    names = F8.fp8_target_names(plain.dit)
    assert names and all(isinstance(fp8.dit.get_submodule(n), F8.FP8Linear) for n in names)
    assert base_fingerprint(fp8.dit) == base_fingerprint(plain.dit)  # a concept moves between the two
    for n in names:
        assert torch.equal(fp8.dit.get_submodule(n).dequantized(),
                           F8.dequantize(*F8.quantize(plain.dit.get_submodule(n).weight), 128, torch.float32))


def test_bad_memory_options_are_refused_in_one_line(monkeypatch):
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"--offload-blocks 4: base 'tiny' has 4 DiT blocks.*choose 0\.\.3"):
        check_memory_options(cfg, None, 4)
    with pytest.raises(ValueError, match="--base-dtype 'fp16': expected fp8"):
        check_memory_options(cfg, "fp16", 0)
    monkeypatch.setattr(F8, "FP8", None)
    with pytest.raises(ValueError, match="needs torch.float8_e4m3fn.*drop --base-dtype fp8"):
        check_memory_options(cfg, "fp8", 0)


def test_convert_dtype_fp8_round_trip_loads_strictly(tmp_path, sp_model_path, capsys):
    """An original-layout Wan DiT converted with --dtype fp8: fp8 block linears + scales in the file,
    everything else bf16; it loads back into FP8Linear layers holding exactly the quantized weights."""
    src = tmp_path / "Wan2.1-T2V-tiny"
    src.mkdir()
    cfg = dataclasses.replace(WAN, text_dim=4096)  # umT5-XXL's width: the parts must fit together
    dit = trained_like(cfg)
    write_safetensors_atomic(src / "diffusion_pytorch_model.safetensors", dit.state_dict())
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": WAN.dim, "eps": 1e-6, "ffn_dim": WAN.ffn_dim, "freq_dim": 256,
        "in_dim": 16, "model_type": "t2v", "num_heads": WAN.heads, "num_layers": WAN.layers, "out_dim": 16,
        "text_len": 512, "text_dim": cfg.text_dim}))
    outs = {}
    for dtype in ("bf16", "fp8"):
        outs[dtype] = tmp_path / dtype
        assert cli_main(["convert", "--from", "wan", str(src), "--out", str(outs[dtype]), "--dtype", dtype,
                         "--parts", "dit", "--tokenizer", sp_model_path]) == 0
    capsys.readouterr()
    header, _ = read_safetensors_header(outs["fp8"] / "dit.safetensors")
    assert header["blocks.1.cross_attn.k.weight"][0] == "F8_E4M3"
    assert header["blocks.1.cross_attn.k.weight_scale"] == ("F32", (2, 2))
    assert header["blocks.1.norm3.weight"][0] == "BF16" and header["head.head.weight"][0] == "BF16"
    assert json.loads((outs["fp8"] / "config.json").read_text())["source"]["dit_linears"] == "fp8"
    m = load_checkpoint(outs["fp8"], parts=("dit",))
    names = F8.fp8_target_names(dit)
    for n in names:
        layer = m.dit.get_submodule(n)
        w8, scale = F8.quantize(dit.get_submodule(n).weight)
        assert isinstance(layer, F8.FP8Linear) and torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))  # the same bytes
    x, t, c = inputs(cfg)
    with torch.no_grad():
        bf16 = load_checkpoint(outs["bf16"], parts=("dit",)).dit
        err = rel(m.dit(x, t, c), bf16(x, t, c))  # both hold the other tensors in bf16: the linears differ
        assert err < FORWARD_BOUND, err
    sizes = {k: (v / "dit.safetensors").stat().st_size for k, v in outs.items()}
    linear_bf16 = sum(2 * dit.get_submodule(n).weight.numel() for n in names)
    assert sizes["bf16"] - sizes["fp8"] >= 0.49 * linear_bf16  # the linears' half, less their scales


def test_both_experts_of_a_two_expert_base_go_to_fp8():
    from model.experts import ExpertPair

    pair = ExpertPair(trained_like(seed=0), trained_like(seed=1), boundary=0.875)
    names = F8.quantize_linears(pair)
    assert len(names) == 2 * 10 * WAN.layers and {n.partition(".")[0] for n in names} == {"high", "low"}
