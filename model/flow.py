"""Flow matching (rectified flow) as plain functions; the network knows nothing of them.

Convention (whole project): flow time t in [0, 1], t = 0 is data and t = 1 is noise,

    x_t = (1 - t) * x0 + t * eps,        v = dx_t/dt = eps - x0,

so a velocity prediction v and an x0 prediction are related by x0 = x_t - t * v.

Precision: time math (sampling, shift, the broadcast t) and every loss run in float32 whatever
the dtype of the tensors (under bf16 the loss of a small velocity error underflows otherwise).
`add_noise` and the x0/velocity conversions compute in float32 and return the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Floor on t when dividing by it (velocity_from_x0): x_t - x0 = t * (eps - x0) vanishes as t -> 0.
T_MIN = 1e-6


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """t (B,) -> (B, 1, ..., 1) float32 on like's device, ready to scale a (B, ...) tensor."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({like.shape[0]},), got {tuple(t.shape)}")
    return t.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps. x0, eps (B, ...), t (B,); t = 0 gives x0, t = 1 gives eps."""
    tb = _bcast(t, x0)
    return ((1 - tb) * x0.float() + tb * eps.float()).to(x0.dtype)


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target dx_t/dt = eps - x0 (independent of t)."""
    return eps - x0


def flow_loss_per_sample(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Mean squared error per sample in float32: (B, ...) -> (B,). Feed it to `loss_by_t_bins`."""
    if v_pred.shape != v_target.shape:
        raise ValueError(f"prediction shape {tuple(v_pred.shape)} != target shape {tuple(v_target.shape)}")
    return (v_pred.float() - v_target.float()).pow(2).flatten(1).mean(dim=1)


def flow_loss(v_pred: Tensor, v_target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Scalar flow-matching loss ||v_pred - v_target||^2, float32.

    The mean over elements of each sample, then over the batch. `weight` (B,) scales each sample's
    term before the batch mean (mean(w * l)), so weight = ones equals no weight and weight = 0
    drops a sample; it is not renormalized by sum(w).
    """
    per_sample = flow_loss_per_sample(v_pred, v_target)  # (B,)
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight must have shape (B,) = {tuple(per_sample.shape)}, "
                         f"got {tuple(weight.shape)}")
    return (weight.to(per_sample) * per_sample).mean()


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift of SD3 / Wan: t' = s t / (1 + (s - 1) t), float32.

    Monotone on [0, 1] with fixed endpoints 0 and 1; s > 1 moves time toward 1 (more noise),
    which larger images/videos need; s = 1 is the identity.
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    t = t.float()
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    n: int,
    *,
    shift: float = 1.0,
    kind: str = "logit_normal",
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n training times in the open interval (0, 1), float32, then shifted by `shift_time`.

    kind "logit_normal": t = sigmoid(loc + scale * N(0, 1)) (SD3's default, mass in the middle);
    kind "uniform": t ~ U(0, 1). The result is clamped to [T_MIN, 1 - T_MIN] so neither
    endpoint (where x_t is exactly data or exactly noise) is ever drawn.
    """
    if kind == "logit_normal":
        u = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(loc + scale * u)
    elif kind == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"unknown time distribution {kind!r}; choose 'logit_normal' or 'uniform'")
    return shift_time(t, shift).clamp(T_MIN, 1 - T_MIN)


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """The data estimate implied by a velocity: x0 = x_t - t v (exact on the straight path)."""
    return (x_t.float() - _bcast(t, x_t) * v.float()).to(x_t.dtype)


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """The velocity implied by an x0 prediction: v = (x_t - x0) / t, t floored at T_MIN.

    Lets an x0-parametrized network (the toy world's) run in the velocity sampler unchanged.
    """
    tb = _bcast(t, x_t).clamp_min(T_MIN)
    return ((x_t.float() - x0.float()) / tb).to(x_t.dtype)


def prediction_loss_per_sample(v_pred: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
                               space: str = "velocity") -> Tensor:
    """Per-sample MSE (B,) in a network's prediction space (DiTConfig.prediction), float32.

    "velocity": ||v_pred - (eps - x0)||^2; "x0": ||(x_t - t v_pred) - x0||^2, the x0 the velocity
    implies (an x0-parametrized DiT returns v = (x_t - x0_hat) / t, so this recovers x0_hat).
    The two differ by a weight of t^2: the same network trained in the wrong space over- or
    under-weights low noise.
    """
    if space == "velocity":
        return flow_loss_per_sample(v_pred, velocity_target(x0, eps))
    if space == "x0":
        return flow_loss_per_sample(x0_from_velocity(x_t, v_pred, t), x0)
    raise ValueError(f"unknown prediction space {space!r}; choose 'velocity' or 'x0'")


def loss_by_t_bins(
    per_sample_loss: Tensor, t: Tensor, bins: int | Sequence[float] = 4
) -> tuple[Tensor, Tensor]:
    """Mean loss per timestep bin, for logging (how well each noise level is learned).

    per_sample_loss (B,), t (B,). `bins` is a number of equal-width bins over [0, 1] or a sorted
    list of edges (n + 1 values; t outside them is not counted). Returns (mean (n,), count (n,)),
    float32; the mean of an empty bin is NaN. Accumulate across steps with mean * count.
    """
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = torch.linspace(0.0, 1.0, bins + 1)
    else:
        edges = torch.tensor(list(bins), dtype=torch.float32)
        if edges.ndim != 1 or len(edges) < 2 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"bin edges must be an increasing list of at least 2 values, got {list(bins)}")
    loss = per_sample_loss.detach().float().cpu()
    t = t.detach().float().cpu()
    n = len(edges) - 1
    # Bin i holds edges[i] <= t < edges[i + 1]; the last bin also takes t == edges[-1].
    idx = torch.bucketize(t, edges, right=True) - 1
    idx = torch.where(t == edges[-1], torch.full_like(idx, n - 1), idx)
    inside = (idx >= 0) & (idx < n)
    count = torch.zeros(n).index_add_(0, idx[inside], torch.ones(int(inside.sum())))
    total = torch.zeros(n).index_add_(0, idx[inside], loss[inside])
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.full((n,), float("nan")))
    return mean, count


def bin_labels(bins: int | Sequence[float] = 4) -> list[str]:
    """Names for the bins of `loss_by_t_bins`, e.g. 't0.00-0.25', for log keys."""
    edges = torch.linspace(0.0, 1.0, bins + 1).tolist() if isinstance(bins, int) else list(bins)
    return [f"t{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
