"""Flow matching functions: the path, the target, the loss, time sampling and shift."""

import math

import pytest
import torch

from model.flow import (
    add_noise,
    bin_labels,
    flow_loss,
    flow_loss_per_sample,
    loss_by_t_bins,
    sample_time,
    shift_time,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)


def _pair(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 2, 3, 5, generator=g), torch.randn(b, 4, 2, 3, 5, generator=g)


def test_loss_is_zero_for_the_true_velocity():
    x0, eps = _pair()
    assert flow_loss(velocity_target(x0, eps), eps - x0).item() == 0.0


def test_loss_is_mean_squared_error_in_fp32():
    x0, eps = _pair()
    pred = velocity_target(x0, eps).bfloat16()
    loss = flow_loss(pred, eps - x0)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, (pred.float() - (eps - x0)).pow(2).mean(), rtol=1e-6)


def test_loss_weight_scales_samples():
    x0, eps = _pair(b=2)
    per = flow_loss_per_sample(x0, eps)
    assert torch.allclose(flow_loss(x0, eps, weight=torch.tensor([1.0, 0.0])), per[0] / 2)
    assert torch.allclose(flow_loss(x0, eps, weight=torch.ones(2)), flow_loss(x0, eps))
    with pytest.raises(ValueError, match="weight"):
        flow_loss(x0, eps, weight=torch.ones(3))


def test_add_noise_endpoints_and_midpoint():
    x0, eps = _pair()
    assert torch.equal(add_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones(3)), eps)
    mid = add_noise(x0, eps, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(mid[1], 0.5 * (x0[1] + eps[1]), atol=1e-6)
    assert torch.allclose(mid[2], 0.25 * x0[2] + 0.75 * eps[2], atol=1e-6)


def test_velocity_target_is_time_derivative_of_path():
    x0, eps = _pair()
    t, dt = torch.full((3,), 0.3), 1e-3
    fd = (add_noise(x0, eps, t + dt) - add_noise(x0, eps, t)) / dt
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-3)


def test_add_noise_rejects_wrong_t_shape():
    x0, eps = _pair()
    with pytest.raises(ValueError, match=r"\(B,\)"):
        add_noise(x0, eps, torch.zeros(2))


def test_shift_time_monotone_with_fixed_endpoints():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 3.0, 5.0):
        ts = shift_time(t, s)
        assert ts[0].item() == 0.0 and ts[-1].item() == 1.0
        assert bool((ts[1:] > ts[:-1]).all())
    assert torch.equal(shift_time(t, 1.0), t)
    assert bool((shift_time(t[1:-1], 3.0) > t[1:-1]).all())  # shift > 1 moves toward noise
    assert math.isclose(shift_time(torch.tensor([0.5]), 3.0).item(), 0.75, rel_tol=1e-6)


def test_shift_time_rejects_non_positive_shift():
    with pytest.raises(ValueError, match="shift"):
        shift_time(torch.tensor([0.5]), 0.0)


@pytest.mark.parametrize("kind", ["logit_normal", "uniform"])
def test_sample_time_in_open_unit_interval_and_shift_moves_mass_up(kind):
    g = torch.Generator().manual_seed(0)
    t = sample_time(20000, kind=kind, generator=g)
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert bool(((t > 0) & (t < 1)).all())
    g = torch.Generator().manual_seed(0)
    ts = sample_time(20000, kind=kind, shift=3.0, generator=g)
    assert ts.mean() > t.mean() + 0.1
    assert bool((ts >= t).all())  # same draws, each shifted upward


def test_sample_time_uniform_has_uniform_mean_and_seed_repeats():
    a = sample_time(20000, kind="uniform", generator=torch.Generator().manual_seed(1))
    b = sample_time(20000, kind="uniform", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5) < 0.01


def test_sample_time_rejects_unknown_kind():
    with pytest.raises(ValueError, match="cosine"):
        sample_time(4, kind="cosine")


def test_x0_and_velocity_conversions_invert_each_other():
    x0, eps = _pair()
    t = torch.tensor([0.1, 0.5, 0.9])
    xt = add_noise(x0, eps, t)
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_velocity(xt, v, t), x0, atol=1e-5)
    assert torch.allclose(velocity_from_x0(xt, x0, t), v, atol=1e-4)
    assert torch.allclose(x0_from_velocity(xt, velocity_from_x0(xt, x0, t), t), x0, atol=1e-5)


def test_loss_by_t_bins_means_and_counts():
    loss = torch.tensor([1.0, 3.0, 10.0, 7.0, 5.0])
    t = torch.tensor([0.1, 0.2, 0.6, 0.99, 1.0])
    mean, count = loss_by_t_bins(loss, t, bins=4)
    assert count.tolist() == [2.0, 0.0, 1.0, 2.0]
    assert mean[0].item() == 2.0 and math.isnan(mean[1].item()) and mean[2].item() == 10.0
    assert mean[3].item() == 6.0
    mean, count = loss_by_t_bins(loss, t, bins=[0.0, 0.5, 0.9])
    assert count.tolist() == [2.0, 1.0]
    assert bin_labels(2) == ["t0.00-0.50", "t0.50-1.00"]
