"""Wan 2.2 A14B's two experts as one DiT-shaped module: the high-noise expert denoises while t >= boundary,
the low-noise expert after.

Both are Wan-2.1-shaped DiTs of one config. `ExpertPair` has the DiT's call signature and routes each
sample of a batch to the expert that serves its time, so everything that takes a DiT (the sampler, the
personalization loop, LoRA injection by module name, concept files) takes the pair unchanged; its module
names are the experts' names under `high.` and `low.`.

The boundary test is Wan's (wan/text2video.py, diffusers' WanPipeline): the timestep t * 1000 against
boundary * num_train_timesteps (1000), high-noise when at or above. Wan truncates its timesteps to
integers first; for a boundary of k / 1000 (0.875, 0.9) floor(x) >= k exactly when x >= k, so comparing the
unrounded values (as diffusers does) decides every step the same way.

Idle-expert offload (sampling only, as Wan's `offload_model`): after `pair.offload_idle(device)` only the
expert a batch needs is on `device`, the other waits on the CPU. A sampling batch shares one t per step, so
the experts swap once per run, at the boundary (and back at the next run's first step); the idle expert
leaves the device before the active one arrives, so at no moment are both there. Personalization trains
both experts each step (its batch splits at the boundary): a mixed batch or a forward with grad is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .offload import host_copy

NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep scale: the boundary is a fraction of it


def serves_high(t: Tensor, boundary: float) -> Tensor:
    """(B,) bool: which flow times t (B,) in [0, 1] the high-noise expert denoises (Wan's comparison)."""
    return t.float() * NUM_TRAIN_TIMESTEPS >= boundary * NUM_TRAIN_TIMESTEPS


def check_boundary(boundary: float) -> None:
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"expert boundary {boundary} must lie strictly between 0 and 1 (Wan 2.2 T2V: 0.875)")


class ExpertPair(nn.Module):
    """forward(x, t, context, context_mask=None, self_cond=None) -> v, each sample from the expert serving its
    t: `high` (Wan's high_noise_model, diffusers' `transformer`) for t >= boundary, `low` (low_noise_model,
    `transformer_2`) below."""

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        check_boundary(boundary)
        if high.cfg != low.cfg:
            raise ValueError(f"the two experts must share one DiT config; high has {high.cfg}, "
                             f"low has {low.cfg}")
        self.high, self.low = high, low
        self.boundary = float(boundary)
        self.offload_device: torch.device | None = None  # set by offload_idle: where the active expert runs
        self.resident: str | None = None  # under offload_idle: the expert now on offload_device

    def keep_on(self, device: torch.device | str, active: str) -> None:
        """The `active` expert on `device`, the other on the CPU; the idle one moves first, so the device
        never holds both."""
        idle = "low" if self.expert(active) is self.high else "high"
        self.expert(idle).to("cpu")
        self.expert(active).to(device)
        self.resident = active

    def offload_idle(self, device: torch.device | str) -> None:
        """Idle-expert offload for sampling (see the module doc): the high-noise expert on `device` now (a run
        starts there), the low-noise one on the CPU until a batch needs it."""
        if any(host_copy(p) is not p for p in self.parameters()):  # model/offload.py's streamed blocks
            raise ValueError("--offload-idle-expert with --offload-blocks: block offload already streams "
                             "each expert's blocks from the host and the two cannot share them; drop one of "
                             "the flags (--offload-idle-expert alone keeps one whole expert on the GPU)")
        self.offload_device = torch.device(device)
        self.keep_on(self.offload_device, "high")

    @property
    def cfg(self):
        return self.high.cfg

    @property
    def gradient_checkpointing(self) -> bool:
        return self.high.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.high.gradient_checkpointing = self.low.gradient_checkpointing = on

    def compile_blocks(self, **kwargs) -> None:
        self.high.compile_blocks(**kwargs)
        self.low.compile_blocks(**kwargs)

    def expert(self, name: str) -> nn.Module:
        if name not in ("high", "low"):
            raise ValueError(f"unknown expert {name!r}; choose 'high' or 'low'")
        return getattr(self, name)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None,
                self_cond: Tensor | None = None) -> Tensor:
        # (B,); a per-token t (B, L) (a clean first frame at t = 0) goes by its sample's noisiest token
        high = serves_high(t if t.ndim == 1 else t.amax(dim=1), self.boundary)
        one = "high" if bool(high.all()) else "low" if not bool(high.any()) else None  # sampling: one t
        if self.offload_device is not None:
            self._check_sampling(mixed=one is None)
            if one != self.resident:
                self.keep_on(self.offload_device, one)  # the switch: once per sampling run
        if one is not None:
            return self.expert(one)(x, t, context, context_mask=context_mask, self_cond=self_cond)
        out = None
        for model, rows in ((self.high, high), (self.low, ~high)):  # training: split the batch by time

            def pick(a: Tensor | None, rows=rows) -> Tensor | None:
                return None if a is None else a[rows]

            v = model(x[rows], t[rows], context[rows], context_mask=pick(context_mask),
                      self_cond=pick(self_cond))
            out = v.new_empty((x.shape[0], *v.shape[1:])) if out is None else out
            out[rows] = v
        return out

    def _check_sampling(self, mixed: bool = False) -> None:
        if mixed or torch.is_grad_enabled():
            raise ValueError("idle-expert offload is for sampling: this forward " + (
                "mixes times of both experts in one batch" if mixed else "needs gradients") + ", as "
                "personalization does (it trains both experts each step); use a pair without offload_idle")


__all__ = ["NUM_TRAIN_TIMESTEPS", "ExpertPair", "serves_high", "check_boundary"]
