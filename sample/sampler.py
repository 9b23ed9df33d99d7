"""One Euler sampler for the flow ODE, with classifier-free guidance and self-conditioning.

The model is any callable with the DiT signature
    model(x, t, context, context_mask=None, self_cond=None) -> v
x (B, C, T', H', W'), t (B,) flow time, context (B, L, D), context_mask (B, L) bool or None,
self_cond (B, C, T', H', W') or None. A LoRA-wrapped DiT is such a callable too; the sampler
knows nothing of adapters. Flow convention as in model/flow.py: t = 1 is noise, t = 0 is data,
v = eps - x0, and the ODE dx/dt = v is integrated from t = 1 down to t = 0.

Two experts (Wan 2.2 A14B, model/experts.py): the model is an ExpertPair that routes each step to the
expert serving its t, and the guidance follows the same switch: `guidance` while the high-noise expert
denoises, `low_noise_guidance` after (`serves_high`, the one comparison both use).

Precision: the state x, the time grid and the guidance mix are float32; the model may compute in
lower precision (autocast) and its output is cast to float32 before it touches the state.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.experts import serves_high
from model.flow import shift_time, x0_from_velocity


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """steps + 1 times from 1 to 0 (float32): a uniform grid passed through `shift_time`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def _pad_context(context: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (B, L, D) tokens to `length`, masking the padding out; a None mask means all real."""
    b, n, _ = context.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=context.device)
    if n < length:
        context = torch.nn.functional.pad(context, (0, 0, 0, length - n))
        mask = torch.nn.functional.pad(mask, (0, length - n), value=False)
    return context, mask


def _cfg_context(
    context: Tensor, context_mask: Tensor | None, uncond_context: Tensor, uncond_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Stack [cond; uncond] along the batch, (2B, L, D), padding the shorter prompt with masked zeros."""
    b = context.shape[0]
    if uncond_context.shape[0] == 1 and b > 1:  # one encoded empty prompt serves the whole batch
        uncond_context = uncond_context.expand(b, -1, -1)
        uncond_mask = None if uncond_mask is None else uncond_mask.expand(b, -1)
    if uncond_context.shape[0] != b or uncond_context.shape[2] != context.shape[2]:
        raise ValueError(f"uncond_context shape {tuple(uncond_context.shape)} does not match context "
                         f"{tuple(context.shape)}; give (B or 1, L, {context.shape[2]})")
    if context_mask is None and uncond_mask is None and context.shape[1] == uncond_context.shape[1]:
        return torch.cat([context, uncond_context]), None
    length = max(context.shape[1], uncond_context.shape[1])
    c, cm = _pad_context(context, context_mask, length)
    u, um = _pad_context(uncond_context.to(context.dtype), uncond_mask, length)
    return torch.cat([c, u]), torch.cat([cm, um])


@torch.no_grad()
def euler_sample(
    model,
    noise: Tensor | tuple[int, ...],
    *,
    steps: int,
    shift: float = 1.0,
    guidance: float = 1.0,
    context: Tensor,
    context_mask: Tensor | None = None,
    uncond_context: Tensor | None = None,
    uncond_mask: Tensor | None = None,
    self_cond: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
    boundary: float | None = None,
    low_noise_guidance: float | None = None,
    first_frame: Tensor | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with `steps` Euler steps; returns x0 (float32).

    noise: the starting x at t = 1, (B, C, T', H', W'), or its shape, drawn here as N(0, 1) with
    `generator` on context's device (so a seed fixes the sample).
    Time grid: `time_grid(steps, shift)`; x <- x + (t_next - t) * v.
    Guidance: v = v_u + g (v_c - v_u), cond and uncond in ONE forward of batch 2B; g = 1 runs the
    conditional model alone (uncond_context is then unused). uncond_context is the encoded empty
    prompt, (B or 1, L_u, D); prompts of different lengths are zero-padded and masked.
    Self-conditioning: the first step gets self_cond=None (the model's zeros); every later step
    gets the previous step's x0 estimate x_t - t * v of the GUIDED velocity, the same tensor for
    the cond and uncond halves.
    Expert switch: with `boundary`, steps at t below it (serves_high false) guide with `low_noise_guidance`
    (None: `guidance`); the model itself picks its expert from t.
    First frame (image-to-video, Wan 2.2 TI2V): `first_frame` (B or 1, C, 1, H', W'), the clean latent of
    frame 0, replaces x's first latent frame before every step and in the result, and that frame's tokens
    get flow time 0 (a per-token t (B, L); diffusers' expand_timesteps); the model must take per-token t.
    """
    if isinstance(noise, Tensor):
        x = noise.float()
    else:
        x = torch.randn(tuple(noise), generator=generator, device=context.device, dtype=torch.float32)
    b = x.shape[0]
    if context.shape[0] != b:
        raise ValueError(f"context batch {context.shape[0]} != noise batch {b}")
    scales = (guidance, guidance if low_noise_guidance is None else low_noise_guidance)
    if boundary is None and scales[1] != guidance:
        raise ValueError(f"low_noise_guidance {low_noise_guidance} needs an expert boundary; "
                         "this model has one DiT")
    use_cfg = scales != (1.0, 1.0)
    if use_cfg:
        if uncond_context is None:
            raise ValueError(f"guidance {guidance} needs uncond_context (the encoded empty prompt); "
                             "pass it, or use guidance 1 for the conditional model alone")
        ctx, ctx_mask = _cfg_context(context, context_mask, uncond_context, uncond_mask)
    else:
        ctx, ctx_mask = context, context_mask

    ts = time_grid(steps, shift, device=x.device)
    keep = None if first_frame is None else _first_frame(first_frame, x, model)
    if keep is not None:
        x = x.clone()  # frame 0 is written in place below: never into the caller's noise
    x0_est: Tensor | None = None
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = ts[i].expand(b)  # (B,)
        if keep is not None:
            x[:, :, :1] = keep[0]
            t = t[:, None] * keep[1]  # (B, L): frame 0's tokens at t = 0
        sc = x0_est if self_cond else None
        g = scales[0] if boundary is None or bool(serves_high(ts[i], boundary)) else scales[1]
        if use_cfg:
            sc2 = None if sc is None else torch.cat([sc, sc])
            out = model(torch.cat([x, x]), torch.cat([t, t]), ctx, context_mask=ctx_mask, self_cond=sc2)
            v_c, v_u = out.float().chunk(2)  # (B, ...) each
            v = v_u + g * (v_c - v_u)
        else:
            v = model(x, t, ctx, context_mask=ctx_mask, self_cond=sc).float()
        if self_cond:
            x0_est = x0_from_velocity(x, v, ts[i].expand(b))
            if keep is not None:
                x0_est[:, :, :1] = keep[0]
        x = x + (ts[i + 1] - ts[i]) * v
    if keep is not None:
        x[:, :, :1] = keep[0]
    return x


def _first_frame(first: Tensor, x: Tensor, model) -> tuple[Tensor, Tensor]:
    """(the clean first latent frame (B, C, 1, H', W') float32, a (1, L) token mask: 0 on its tokens)."""
    b, c, _, h, w = x.shape
    if first.ndim != 5 or first.shape[0] not in (1, b) or tuple(first.shape[1:]) != (c, 1, h, w):
        raise ValueError(f"first_frame must be the latent of one frame, ({b} or 1, {c}, 1, {h}, {w}); got "
                         f"{tuple(first.shape)}")
    pt, ph, pw = model.cfg.patch
    if pt != 1:
        raise ValueError(f"a first-frame condition needs a DiT time patch of 1 (its own tokens); got {pt}")
    per_frame = (h // ph) * (w // pw)
    mask = torch.ones(1, x.shape[2] * per_frame, device=x.device)
    mask[:, :per_frame] = 0
    return first.to(x.device, torch.float32).expand(b, -1, -1, -1, -1), mask


Text = tuple[Tensor, Tensor | None]  # encoded prompt tokens (B, L, D) and their mask (B, L)


def sample_latents(dit, noise: Tensor | tuple[int, ...], cond: Text, uncond: Text, *, steps: int,
                   guidance: float, shift: float, self_cond: bool | None = None,
                   generator: torch.Generator | None = None, progress: bool = False,
                   low_noise_guidance: float | None = None, first_frame: Tensor | None = None) -> Tensor:
    """The one way callers sample: `euler_sample` with the prompts as (tokens, mask) pairs and
    self-conditioning on whenever the DiT has it (None), unless the caller turns it off. A two-expert DiT
    (ExpertPair) switches experts at its boundary, guiding the low-noise stage with `low_noise_guidance`
    (None: `guidance`). `first_frame`: the clean latent kept as frame 0 (image-to-video; see euler_sample)."""
    if self_cond is None:
        self_cond = bool(getattr(dit.cfg, "self_cond", False))
    return euler_sample(dit, noise, steps=steps, shift=shift, guidance=guidance, context=cond[0],
                        context_mask=cond[1], uncond_context=uncond[0], uncond_mask=uncond[1],
                        self_cond=self_cond, generator=generator, progress=progress,
                        boundary=getattr(dit, "boundary", None), low_noise_guidance=low_noise_guidance,
                        first_frame=first_frame)
