"""DiT: shapes, zero-initialized inputs, the padding mask, learning, size, and input checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import PRESETS, DiTConfig
from model.dit import DiT, split_modulation

CFG = DiTConfig(in_channels=4, out_channels=4, dim=32, heads=2, layers=2, ffn_dim=64, text_dim=16,
                freq_dim=32, qk_norm="rms_per_head", self_cond=True)


def randomize(model: DiT, seed: int = 0, skip: str = "\0") -> DiT:
    """Give every parameter (except names containing `skip`) random values, so no zero-init hides a path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(b=2, grid=(3, 4, 6), n=7, cfg=CFG, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.in_channels, *grid, generator=g), torch.rand(b, generator=g),
            torch.randn(b, n, cfg.text_dim, generator=g))


def test_output_shape():
    x, t, ctx = inputs()
    assert DiT(CFG)(x, t, ctx).shape == x.shape


def test_fresh_model_predicts_zero_velocity():
    x, t, ctx = inputs()
    assert DiT(CFG)(x, t, ctx).abs().max() == 0  # zero-initialized head.head


def test_zero_init_self_cond_is_a_no_op():
    model = randomize(DiT(CFG), skip="self_cond_embedding")
    x, t, ctx = inputs()
    prev = torch.randn_like(x)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, self_cond=prev), model(x, t, ctx))
        randomize(model)  # once the input projection is trained, self_cond matters
        assert (model(x, t, ctx, self_cond=prev) - model(x, t, ctx)).abs().max() > 1e-4


def test_head_mlp_starts_as_the_linear_head_and_reaches_beyond_its_span():
    cfg = dataclasses.replace(CFG, dim=12, heads=2, rope_split=(2, 2, 2), head_hidden=32)
    linear = randomize(DiT(dataclasses.replace(cfg, head_hidden=None)))
    model = DiT(cfg).eval()
    missing, unexpected = model.load_state_dict(linear.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["head.mlp.0.bias", "head.mlp.0.weight", "head.mlp.2.bias",
                                                  "head.mlp.2.weight"]
    x, t, ctx = inputs(grid=(3, 4, 4), cfg=cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), linear(x, t, ctx))  # zero output layer: a no-op until trained
        # A token's 16 outputs (4 channels x 2x2 patch) from 12 features: the Linear head's centred
        # outputs have rank <= 12, the MLP's do not.
        feats = torch.randn(512, cfg.dim)
        lin = linear.head.head(feats)
        randomize(model)
        mlp = model.head.head(feats) + model.head.mlp(feats)
    rank = lambda y: int(torch.linalg.matrix_rank(y - y.mean(0), rtol=1e-5))  # noqa: E731
    assert rank(lin) == 12 and rank(mlp) == 16


def test_padding_mask_hides_padded_context():
    model = randomize(DiT(CFG))
    x, t, ctx = inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 5:] = False
    other = ctx.clone()
    other[~mask] = torch.randn(int((~mask).sum()), CFG.text_dim)
    with torch.no_grad():
        assert torch.allclose(model(x, t, ctx, mask), model(x, t, other, mask), atol=1e-6)
        assert (model(x, t, ctx) - model(x, t, other)).abs().max() > 1e-4  # unmasked: they would matter
        assert torch.equal(model(x, t, ctx, torch.ones_like(mask)), model(x, t, ctx))  # Wan: mask=None


@pytest.mark.parametrize("kind", ["rms_across_heads", "rms_per_head", "layer_per_head", "none"])
def test_qk_norm_kinds(kind):
    cfg = dataclasses.replace(CFG, qk_norm=kind)
    model = DiT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "self_attn.norm_q" in k}
    w, b = "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_q.bias"
    want = {"rms_across_heads": {w: (32,)}, "rms_per_head": {w: (16,)},
            "layer_per_head": {w: (16,), b: (16,)}, "none": {}}[kind]
    assert {k: v for k, v in shapes.items() if k.startswith("blocks.0.")} == want
    x, t, ctx = inputs()
    assert torch.isfinite(randomize(model)(x, t, ctx)).all()


def test_modulation_chunk_order():
    m = torch.arange(6.0)[None, :, None].expand(1, 6, 3)  # chunk i holds the value i
    sa, ff = split_modulation(m)
    chunks = (sa.shift, sa.scale, sa.gate, ff.shift, ff.scale, ff.gate)
    assert [float(z[0, 0, 0]) for z in chunks] == list(range(6))


def test_per_block_modulation_starts_as_identity_blocks():
    cfg = dataclasses.replace(CFG, modulation="per_block", text_proj=False, abs_pos=(4, 4, 4))
    model = DiT(cfg)
    names = set(model.state_dict())
    assert "blocks.0.adaLN.weight" in names and "time_projection.1.weight" not in names
    assert "text_embedding.0.weight" not in names and model.blocks[0].cross_attn.k.in_features == cfg.text_dim
    x, t, ctx = inputs(cfg=cfg)
    tokens = torch.randn(2, 72, cfg.dim)
    e, time = model._time(t)
    freqs = torch.ones(72, cfg.head_dim // 2, dtype=torch.complex128)
    assert torch.equal(model.blocks[0](tokens, time, ctx, freqs, None), tokens)  # adaLN-Zero: gates are 0
    assert model(x, t, ctx).shape == x.shape


def test_gradient_checkpointing_gives_same_gradients():
    x, t, ctx = inputs()
    grads = []
    for flag in (False, True):
        model = randomize(DiT(CFG)).train()
        model.gradient_checkpointing = flag
        model(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_windowed_dit_limits_receptive_field():
    """With one block, window 2 and no cross-attn path differences, output tokens far from a changed input
    token are unaffected (the block attends only |i - j| <= 1 in (T, H, W) token order)."""
    cfg = dataclasses.replace(CFG, layers=1, window=2, self_cond=False)
    model = randomize(DiT(cfg))
    x, t, ctx = inputs(grid=(1, 2, 16))  # 1 x 1 x 8 tokens
    y = x.clone()
    y[..., 0:2] += 1.0  # token 0 only
    with torch.no_grad():
        diff = (model(x, t, ctx) - model(y, t, ctx)).abs().amax(dim=(0, 1, 2, 3))  # (W,)
    assert diff[:4].min() > 0 and diff[4:].max() == 0  # tokens 0, 1 change; 2.. do not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_matches_fp32_cpu():
    """The GPU path (bf16 autocast, the windowed attention's CUDA backend, gradient checkpointing) computes
    the CPU fp32 model's function and gradients within bf16 rounding."""
    cfg = dataclasses.replace(CFG, window=600)
    x, t, ctx = inputs(b=1, grid=(8, 32, 32))  # 2048 tokens: FlexAttention on CUDA; the window excludes keys
    results = []
    for device in ("cpu", "cuda"):
        model = randomize(DiT(cfg)).train().to(device)
        model.gradient_checkpointing = device == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(x.to(device), t.to(device), ctx.to(device))
        out.float().square().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((out.float().cpu(), grad.cpu()))
    (out32, grad32), (out16, grad16) = results
    assert (out16 - out32).norm() / out32.norm() < 2e-2
    assert (grad16 - grad32).norm() / grad32.norm() < 3e-2


def test_tiny_dit_overfits_one_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, self_cond=False)
    model = DiT(cfg).train()
    x0, t, ctx = inputs(grid=(2, 4, 4))
    eps = torch.randn_like(x0)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = (model(xt, t, ctx) - (eps - x0)).square().mean()
        losses.append(loss.item())
        if loss.item() < losses[0] / 10:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


def test_paper_preset_has_about_11_5b_parameters():
    with torch.device("meta"):
        model = DiT(PRESETS["paper"].dit)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 11.5e9 - 1) < 0.05, f"{n / 1e9:.2f}B parameters"
    cfg = PRESETS["paper"].dit
    tokens = (16 // cfg.patch[0]) * (36 // cfg.patch[1]) * (64 // cfg.patch[2])  # 121 frames 576x1024 latent
    assert tokens == 9216


def test_bad_inputs_raise():
    model = DiT(CFG)
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="latents"):
        model(x[0], t, ctx)
    with pytest.raises(ValueError, match="in_channels"):
        model(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(x[..., :5], t, ctx)
    with pytest.raises(ValueError, match="text_dim"):
        model(x, t, ctx[..., :8])
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t[:1], ctx)
    with pytest.raises(ValueError, match="no real token"):
        model(x, t, ctx, torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="self_cond"):
        DiT(dataclasses.replace(CFG, self_cond=False))(x, t, ctx, self_cond=x)
