"""One training step's pieces: what a stage trains and its optimizer, and the flow-matching loss of one
drawn batch (forward only; the loop in train/personalize.py does backward, clipping and the step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora.inject import concept_adapters, lora_layers, set_stage
from lora.tokens import AddedTokens
from model.flow import add_noise, prediction_loss_per_sample, sample_time, x0_from_velocity

from .config import PersonalizeConfig
from .data import mask_tokens
from .stage_data import Batch, StageData, batch_context, draw_batch


def trained_params(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens, stage: int
                   ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(LoRA factors, token embeddings) a stage trains; everything else is frozen."""
    set_stage(dit, stage if cfg.train_lora else 0, concepts=[cfg.name], dropout=cfg.dropout(stage))
    lora = [p for p in dit.parameters() if p.requires_grad]
    for p in tokens.parameters():
        p.requires_grad_(False)
    emb = [tokens.embedding(t) for t in cfg.stage_tokens(stage)]
    for p in emb:
        p.requires_grad_(True)
    return lora, emb


def build_optimizer(cfg: PersonalizeConfig, lora: list[nn.Parameter], emb: list[nn.Parameter]
                    ) -> torch.optim.AdamW:
    """AdamW (paper Table 6); the token embeddings in their own group at token_lr. Fused: one kernel over
    every tensor instead of a Python loop over ~100 small LoRA factors (CPU: 2.0 vs 7.3 ms a step with
    the clip at the small benchmark size; results agree with the loop to float rounding)."""
    groups = [{"params": lora, "lr": cfg.lr}] if lora else []
    if emb:
        groups.append({"params": emb, "lr": cfg.token_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


# Divergence before NaN: an adapter whose update bound (AdapterGrowth) reaches this multiple of the base
# weights it adapts has blown up. Seven healthy toy concepts of the demo and compose benches (lr 1e-3, ten
# times the paper's; 300-2400 steps) end at 0.2-0.7, so 100 leaves a wide margin; --lr 1e3 crosses it at
# the first step.
BLOWUP = 100.0


class AdapterGrowth:
    """sqrt(sum ||B1 + B2||^2 ||A1||^2) / sqrt(sum ||W||^2) over the adapted layers (an upper bound of the
    update's size relative to the base weights; over all layers, since a base may hold zero-initialized
    ones) and the layer with the largest bound; one device sync a call. NaN weights give inf."""

    def __init__(self, dit: nn.Module, concept: str):
        adapters = concept_adapters(dit, concept)
        layers = lora_layers(dit)
        self.names = list(adapters)
        self.adapters = [adapters[n] for n in self.names]
        with torch.no_grad():
            norms = [layers[n].base_norm() for n in self.names]  # fp8 dequantized, offloaded from the host
            self.base = torch.stack(norms).norm().clamp_min(1e-12) if norms else None

    @torch.no_grad()
    def __call__(self) -> tuple[float, str]:
        if not self.names:
            return 0.0, ""
        bound = torch.stack([(a.lora_B1 + a.lora_B2).float().norm() * a.lora_A1.float().norm()
                             for a in self.adapters])
        ratio = torch.nan_to_num(bound.norm() / self.base, nan=float("inf"))
        return float(ratio), self.names[int(torch.nan_to_num(bound, nan=float("inf")).argmax())]


@dataclass
class StepOut:
    loss: Tensor  # scalar, weighted concept + prior
    per_sample: Tensor  # (B,) detached
    t: Tensor  # (B,)
    batch: Batch


def loss_step(cfg: PersonalizeConfig, dit: nn.Module, t5: nn.Module, data: StageData, g: torch.Generator,
              shift: float, share: slice | None = None) -> StepOut:
    """One flow-matching loss on a drawn batch (forward only; the caller steps the optimizer).

    share: this process's items of the batch in a data-parallel run (train/distributed.py). Every draw is
    still made for the whole batch, so each item gets what it would in one process; the loss is the
    share's part of the whole batch's weighted sum."""
    batch = draw_batch(cfg, data, g)
    x0 = batch.x0
    b, device = x0.shape[0], x0.device
    context, mask = batch_context(data, batch.prompt, t5, bool(data.trained_ids))
    context, mask = mask_tokens(context, mask, cfg.token_mask_prob, g)
    t = expert_times(sample_time(b, shift=shift, generator=g, device=device), dit, cfg.expert)
    eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
    x_t = add_noise(x0, eps, t)
    use = _self_cond_draw(cfg, dit, b, g, device)
    if share is not None:
        x0, eps, x_t, t, context, mask = (a[share] for a in (x0, eps, x_t, t, context, mask))
        batch = Batch(batch.x0[share], batch.prompt[share], batch.weight[share], batch.is_prior[share])
        use = use[share] if use is not None else None
    self_cond = _self_condition(dit, x_t, t, context, mask, use)
    v = dit(x_t, t, context, context_mask=mask, self_cond=self_cond)
    # The loss lives in the base's own prediction space (x0 for the toy world's tiny DiT).
    space = getattr(dit.cfg, "prediction", "velocity")
    per_sample = prediction_loss_per_sample(v, x_t, x0, eps, t, space)  # (B,) fp32
    return StepOut((batch.weight * per_sample).sum(), per_sample.detach(), t, batch)


def expert_times(t: Tensor, dit: nn.Module, expert: str) -> Tensor:
    """Times for a run that trains one expert of a two-expert DiT: the drawn t mapped linearly into the range
    that expert serves, [boundary, 1) for "high" and (0, boundary) for "low" (model/experts.py); unchanged for
    "both" (each sample reaches the expert its t serves) and for one-DiT bases."""
    boundary = getattr(dit, "boundary", None)
    if boundary is None or expert == "both":
        return t
    lo, hi = (boundary, 1.0) if expert == "high" else (0.0, boundary)
    return lo + (hi - lo) * t


def _self_cond_draw(cfg: PersonalizeConfig, dit: nn.Module, b: int, g: torch.Generator,
                    device: torch.device) -> Tensor | None:
    """Which items get self-conditioning, each with probability self_cond_prob (Chen et al.); None when
    the DiT has no self-conditioning input or no item of the whole batch drew it."""
    if not (getattr(dit.cfg, "self_cond", False) and cfg.self_cond_prob > 0):
        return None
    use = torch.rand(b, generator=g, device=device) < cfg.self_cond_prob
    return use if bool(use.any()) else None


def _self_condition(dit: nn.Module, x_t: Tensor, t: Tensor, context: Tensor, mask: Tensor,
                    use: Tensor | None) -> Tensor | None:
    """The model's own x0 estimate as input to the items that drew it (zero for the others)."""
    if use is None:
        return None
    with torch.no_grad():
        v0 = dit(x_t, t, context.detach(), context_mask=mask)
    return x0_from_velocity(x_t, v0, t) * use.view(-1, 1, 1, 1, 1).to(x_t.dtype)
