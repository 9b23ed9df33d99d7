"""The Euler sampler: exactness on a straight flow, determinism, guidance and self-conditioning."""

import pytest
import torch

from sample.sampler import euler_sample, time_grid

SHAPE = (2, 4, 3, 4, 4)  # (B, C, T', H', W')


def _ctx(b=2, n=5, d=8, seed=1):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


class Oracle:
    """v(x_t, t) = (x_t - x0) / t: the exact velocity of the straight path to a known x0."""

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x, t, context, context_mask=None, self_cond=None):
        return (x - self.x0) / t.view(-1, 1, 1, 1, 1)


class Recorder:
    """Returns a fixed velocity and records every call's arguments."""

    def __init__(self, v=0.5):
        self.v, self.calls = v, []

    def __call__(self, x, t, context, context_mask=None, self_cond=None):
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=context, mask=context_mask,
                               self_cond=None if self_cond is None else self_cond.clone()))
        return torch.full_like(x, self.v)


class CondShift:
    """Velocity = x plus a constant that depends on the prompt: c_cond for real prompts, c_unc for
    the (all-zeros) empty prompt, so cond and uncond outputs differ by a known constant."""

    def __init__(self, c_cond=2.0, c_unc=-1.0):
        self.c_cond, self.c_unc, self.batches = c_cond, c_unc, []

    def __call__(self, x, t, context, context_mask=None, self_cond=None):
        self.batches.append(x.shape[0])
        is_cond = context.abs().sum(dim=(1, 2)) > 0  # (B,)
        c = torch.where(is_cond, self.c_cond, self.c_unc).view(-1, 1, 1, 1, 1)
        return 0.1 * x + c


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_oracle_velocity_returns_x0(shift):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = euler_sample(Oracle(x0), noise, steps=7, shift=shift, context=_ctx(), progress=False)
    assert torch.allclose(out, x0, atol=1e-5), (out - x0).abs().max()


def test_time_grid_runs_from_one_to_zero_with_shift():
    ts = time_grid(4, shift=3.0)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and len(ts) == 5
    assert bool((ts[1:] < ts[:-1]).all())
    assert torch.allclose(ts[2], torch.tensor(0.75))  # shift_time(0.5, 3)


def test_deterministic_for_a_seed():
    model = CondShift()
    a = euler_sample(model, SHAPE, steps=3, context=_ctx(), generator=torch.Generator().manual_seed(5),
                     progress=False)
    b = euler_sample(model, SHAPE, steps=3, context=_ctx(), generator=torch.Generator().manual_seed(5),
                     progress=False)
    c = euler_sample(model, SHAPE, steps=3, context=_ctx(), generator=torch.Generator().manual_seed(6),
                     progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_one_equals_conditional_path():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond_only = CondShift()
    a = euler_sample(cond_only, noise, steps=4, guidance=1.0, context=_ctx(), progress=False)
    guided = CondShift()
    b = euler_sample(guided, noise, steps=4, guidance=1.0, context=_ctx(),
                     uncond_context=torch.zeros(1, 5, 8), progress=False)
    assert torch.equal(a, b)
    assert guided.batches == [2] * 4  # one forward of batch B per step, no uncond pass


def test_cfg_formula_with_known_cond_uncond_gap():
    # v_c - v_u = 3 everywhere, so with guidance g: v = v_u + g * 3 = 0.1 x - 1 + 3 g.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g, steps = 4.0, 3
    model = CondShift(c_cond=2.0, c_unc=-1.0)
    out = euler_sample(model, noise, steps=steps, guidance=g, context=_ctx(),
                       uncond_context=torch.zeros(1, 5, 8), progress=False)
    assert model.batches == [4] * steps  # cond and uncond batched in one forward
    x, ts = noise.clone(), time_grid(steps)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * (0.1 * x - 1.0 + 3.0 * g)
    assert torch.allclose(out, x, atol=1e-6)


def test_cfg_pads_prompts_of_different_lengths_with_masked_zeros():
    model = Recorder()
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    euler_sample(model, SHAPE, steps=1, guidance=2.0, context=_ctx(n=5), context_mask=mask,
                 uncond_context=torch.zeros(1, 2, 8), progress=False)
    call = model.calls[0]
    assert call["context"].shape == (4, 5, 8)
    assert call["mask"].tolist() == mask.tolist() + [[True, True, False, False, False]] * 2


def test_cfg_without_uncond_context_is_an_error():
    with pytest.raises(ValueError, match="uncond_context"):
        euler_sample(Recorder(), SHAPE, steps=2, guidance=3.0, context=_ctx(), progress=False)


def test_self_cond_receives_previous_x0_estimate():
    model = Recorder(v=0.5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    euler_sample(model, noise, steps=3, shift=2.0, context=_ctx(), self_cond=True, progress=False)
    assert model.calls[0]["self_cond"] is None
    for prev, call in zip(model.calls[:-1], model.calls[1:], strict=True):
        expected = prev["x"] - prev["t"].view(-1, 1, 1, 1, 1) * 0.5  # x_t - t v at the previous step
        assert torch.allclose(call["self_cond"], expected, atol=1e-6)


def test_self_cond_uses_guided_estimate_for_both_halves():
    model = Recorder(v=0.5)
    euler_sample(model, SHAPE, steps=2, guidance=3.0, context=_ctx(), uncond_context=torch.zeros(1, 5, 8),
                 self_cond=True, progress=False)
    prev, call = model.calls
    b = SHAPE[0]
    expected = prev["x"][:b] - prev["t"][:b].view(-1, 1, 1, 1, 1) * 0.5  # guided v = 0.5 too
    assert torch.allclose(call["self_cond"][:b], expected, atol=1e-6)
    assert torch.equal(call["self_cond"][:b], call["self_cond"][b:])


def test_self_cond_off_passes_none():
    model = Recorder()
    euler_sample(model, SHAPE, steps=3, context=_ctx(), self_cond=False, progress=False)
    assert all(c["self_cond"] is None for c in model.calls)


def test_tiny_dit_cfg_batch_equals_separate_passes():
    """With the real DiT, one padded+masked [cond; uncond] batch gives the same guided step as two
    separate unpadded forwards (the padding the sampler adds is invisible to the model)."""
    from model.config import PRESETS

    dit = pytest.importorskip("model.dit")
    torch.manual_seed(0)
    model = dit.DiT(PRESETS["tiny"].dit).eval()
    for p in model.parameters():  # the fresh model's zero head predicts v = 0; give it a real output
        torch.nn.init.normal_(p, std=0.05)
    noise = torch.randn(1, model.cfg.in_channels, 2, 4, 4)
    cond, uncond = torch.randn(1, 6, 64), torch.randn(1, 2, 64)
    out = euler_sample(model, noise, steps=1, guidance=3.0, context=cond, uncond_context=uncond,
                       self_cond=True, progress=False)
    t = torch.ones(1)
    with torch.no_grad():
        v_c, v_u = model(noise, t, cond), model(noise, t, uncond)
    expected = noise - (v_u + 3.0 * (v_c - v_u))
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
