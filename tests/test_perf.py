"""Performance knobs keep the numbers (cached RoPE table, real-arithmetic rotation, oneDNN 3D conv,
VAE buffers rebuilt on load), and the benchmarks' timing helper measures what it says. Speed itself
is measured by benchmarks/, never asserted here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.timing import current_bytes, interleaved, peak_bytes, reset_peak
from model.config import VAEConfig
from model.rope import _rotate_real, apply_rope, rope_3d, rope_table
from model.vae import VAE
from model.vae_blocks import conv3d
from weights.load import load_into

GRID, AXES = (3, 4, 5), (8, 4, 4)


def test_rope_table_is_rope_3d_in_complex64_and_cached():
    table = rope_table(GRID, AXES, 10000.0, torch.device("cpu"))
    assert table.dtype == torch.complex64
    assert torch.equal(table, rope_3d(GRID, AXES).to(torch.complex64))
    assert rope_table(GRID, AXES, 10000.0, torch.device("cpu")) is table


def test_rope_real_forms_equal_the_complex_rotation():
    x = torch.randn(2, 3, 60, 16)
    freqs = rope_3d(GRID, AXES)
    want = apply_rope(x, freqs)
    as_real = torch.view_as_real(freqs.to(torch.complex64))
    assert torch.allclose(apply_rope(x, as_real), want, atol=0, rtol=0)  # eager: the same complex multiply
    err = (_rotate_real(x, as_real) - want).abs().max().item()  # the torch.compile form
    assert err <= 1e-6, f"real-arithmetic rotation differs by {err:.1e} > 1e-6"


def test_rope_table_made_under_inference_mode_serves_training():
    grid = (2, 3, 7)  # a grid no other test asks for: this call builds the table
    with torch.inference_mode():
        table = rope_table(grid, AXES, 10000.0, torch.device("cpu"))
    x = torch.randn(1, 2, 42, 16, requires_grad=True)
    apply_rope(x, torch.view_as_real(table)).sum().backward()  # an inference tensor would raise here
    assert x.grad is not None and not table.is_inference()


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 1, 1)])
def test_conv3d_fast_path_matches_conv3d_with_gradients(stride):
    conv = torch.nn.Conv3d(8, 16, (3, 3, 3), stride=stride)
    x = torch.randn(1, 8, 5, 10, 12, requires_grad=True)
    got = conv3d(conv, x)
    got.square().sum().backward()
    grads = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    want = F.conv3d(x, conv.weight, conv.bias, stride)
    want.square().sum().backward()
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grads[0], x.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(grads[1], conv.weight.grad, atol=1e-3, rtol=1e-4)


def test_vae_init_buffers_rebuilds_latent_statistics_on_load():
    cfg = VAEConfig(
        latent_channels=4,
        base_channels=8,
        channel_mult=(1, 2),
        encoder_blocks=(1, 1),
        decoder_blocks=(1, 1),
        time_strides=(2, 1),
        space_strides=(2, 1),
        norm_groups=4,
        latents_mean=(0.5, -1.0, 0.0, 2.0),
        latents_std=(2.0, 0.5, 1.0, 3.0),
    )
    built = []

    def ctor() -> VAE:
        built.append(1)
        return VAE(cfg)

    state = VAE(cfg).state_dict()
    vae = load_into(ctor, state, source="test")
    assert len(built) == 1  # the meta build only: init_buffers, not a second CPU build, made the buffers
    assert vae.latents_mean.device.type == "cpu"
    assert vae.latents_mean.flatten().tolist() == [0.5, -1.0, 0.0, 2.0]
    assert vae.latents_std.flatten().tolist() == [2.0, 0.5, 1.0, 3.0]


def test_interleaved_rotates_order_and_excludes_warmup():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    samples = interleaved(fns, repeats=3, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warmup, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each repeat starts one later
    assert {n: len(s) for n, s in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_peak_memory_sees_a_transient_allocation():
    reset_peak("cpu")
    before = current_bytes("cpu")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert peak_bytes("cpu") - before >= 48 * 2**20


@pytest.mark.slow
def test_compiled_blocks_match_eager_forward_and_gradients():
    from model.config import DiTConfig
    from model.dit import DiT

    cfg = DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=2, ffn_dim=64, text_dim=16)
    torch.manual_seed(0)
    eager = DiT(cfg)
    torch.nn.init.normal_(eager.head.head.weight, std=0.1)
    compiled = DiT(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x, t, ctx = torch.randn(2, 4, 3, 4, 6), torch.tensor([0.2, 0.9]), torch.randn(2, 5, 16)
    outs, grads = [], []
    for model in (eager, compiled):
        out = model(x, t, ctx)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(model.blocks[0].self_attn.q.weight.grad)
    err = (outs[0] - outs[1]).abs().max().item()
    assert err <= 1e-5, f"compiled blocks differ from eager by {err:.1e} > 1e-5"
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
