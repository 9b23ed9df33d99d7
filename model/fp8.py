"""fp8 base weights: the frozen DiT's block linears stored as float8_e4m3fn with block-wise scales.

    W (out, in)  ->  W8 (out, in) float8_e4m3fn  +  scale (ceil(out/128), ceil(in/128)) fp32
    W ≈ W8 * scale, each scale covering one 128 x 128 tile of W

Why 128 x 128 tiles (DeepSeek-V3's weight blocks): the error of e4m3 is its 3-bit mantissa, the same in
every binade, so a finer grid buys little (measured on a Wan-shaped block: 1 x 128 tiles gave the same
relative error to 3 digits); a 128 x 128 grid costs 4 bytes per 16,384 weights, so the stored linears are
half their bf16 size to 0.02%. A tile keeps one outlier row or column from crushing the whole matrix.

Why power-of-two scales: scale = 2^e, the smallest with max|tile| / scale <= 448 (e4m3's largest
value). Every normal e4m3 binade has the same precision, so rounding the scale up to a power of two
loses nothing but one binade of headroom at the small end; in exchange dequantization is exact in any
dtype (an e4m3 value times 2^e is representable in bf16 and fp32), so the dequantized weight is the same
tensor on the CPU (fp32) and on CUDA (bf16).

Which layers: the attention q/k/v/o (self and cross) and both FFN linears of every block
(`FP8_TARGETS`, the layers LoRA wraps). Norms, embeddings, the time MLP, modulation tables, per-block
adaLN and the head stay in the base dtype: they are <2% of Wan's parameters and carry the precision
islands (model/dit.py). `FP8Linear` keeps nn.Linear's interface (in_features, out_features, `weight`,
`bias`), so LoRA wraps it by name like any Linear and the adapters stay fp32.

The matmul runs in the compute dtype (autocast's, else the input's): the weight is dequantized in the
forward and again in the backward (`_FP8Matmul` saves the fp8 weight, not a bf16 copy), so without
gradient checkpointing a step keeps no full-precision copy of any weight alive.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = getattr(torch, "float8_e4m3fn", None)  # None on a torch build without float8 (< 2.1)
E4M3_MAX = 448.0
BLOCK = 128
# The block linears that go to fp8 (module names of model/dit.py, the set LoRA targets by default), also
# under a two-expert base's `high.` / `low.` (model/experts.py).
FP8_TARGETS: tuple[str, ...] = (
    r"((high|low)\.)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)",
    r"((high|low)\.)?blocks\.\d+\.ffn\.(0|2)",
)


def check_fp8_available() -> None:
    if FP8 is None:
        raise ValueError(f"--base-dtype fp8 needs torch.float8_e4m3fn, which this PyTorch "
                         f"({torch.__version__}) lacks; install torch >= 2.1 or drop --base-dtype fp8")


def scale_shape(out_features: int, in_features: int, block: int = BLOCK) -> tuple[int, int]:
    return math.ceil(out_features / block), math.ceil(in_features / block)


def quantize(weight: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (fp8 weight (out, in), fp32 power-of-two scales (out/block, in/block))."""
    check_fp8_available()
    w = weight.detach().float()
    out, inp = w.shape
    so, si = scale_shape(out, inp, block)
    padded = F.pad(w, (0, si * block - inp, 0, so * block - out))
    amax = padded.abs().view(so, block, si, block).amax(dim=(1, 3))  # (so, si)
    _, exp = torch.frexp(amax / E4M3_MAX)  # amax / 448 = m * 2^exp, m in [0.5, 1): 2^exp >= amax / 448
    scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exp), torch.ones_like(amax))
    q = (w / _expand(scale, (out, inp), block)).clamp(-E4M3_MAX, E4M3_MAX)  # e4m3fn has no inf: clamp
    return q.to(FP8), scale


def dequantize(w8: Tensor, scale: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """fp8 weight and its tile scales -> the (out, in) weight in `dtype` (exact: the scales are 2^e)."""
    out, inp = w8.shape
    if out % block == 0 and inp % block == 0:  # Wan's every width: one temporary, no expanded scale tensor
        so, si = scale.shape
        w = w8.to(dtype, copy=True)  # a new tensor even if w8 were already `dtype`: mul_ must not touch it
        w.view(so, block, si, block).mul_(scale.to(dtype)[:, None, :, None])
        return w
    return w8.to(dtype) * _expand(scale.to(dtype), (out, inp), block)


def _expand(scale: Tensor, shape: tuple[int, int], block: int) -> Tensor:
    """(so, si) tile scales -> (out, in), each tile's scale repeated over it (ragged last tiles cut)."""
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


class _FP8Matmul(torch.autograd.Function):
    """x @ dequant(W8)^T, saving the fp8 weight (1 byte a weight) for the backward instead of the
    dequantized copy the autograd of F.linear would keep. The weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x: Tensor, w8: Tensor, scale: Tensor, block: int, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(w8, scale)
        ctx.block = block
        return F.linear(x, dequantize(w8, scale, block, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w8, scale = ctx.saved_tensors
        return grad @ dequantize(w8, scale, ctx.block, grad.dtype), None, None, None, None


def fp8_linear(x: Tensor, w8: Tensor, scale: Tensor, block: int, bias: Tensor | None) -> Tensor:
    """F.linear with an fp8 weight, in autocast's dtype when autocast is on (as F.linear would be).
    The bias goes into the same F.linear (the fused add of a plain Linear) unless it is trained."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    trained = bias is not None and bias.requires_grad
    fused = None if bias is None or trained else bias.to(dtype)
    y = _FP8Matmul.apply(x.to(dtype), w8, scale, block, fused)
    return y + bias.to(y.dtype) if trained else y


class FP8Linear(nn.Linear):
    """An nn.Linear whose frozen `weight` is float8_e4m3fn with a `weight_scale` buffer of 128 x 128 tile
    scales (state dict: `weight`, `weight_scale`, `bias`); `bias` stays in the base dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 block: int = BLOCK) -> None:
        check_fp8_available()
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.block = block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                     requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(scale_shape(out_features, in_features, block),
                                                        device=device, dtype=torch.float32))

    def reset_parameters(self) -> None:
        """Nothing to draw: an FP8Linear is made from a trained Linear (`from_linear`) or loaded."""

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK) -> FP8Linear:
        w8, scale = quantize(linear.weight, block)
        bias = linear.bias
        new = cls(linear.in_features, linear.out_features, bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype, block=block)
        new.weight.copy_(w8)
        new.weight_scale.copy_(scale)
        if bias is not None:
            new.bias.copy_(bias)
        return new.train(linear.training)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight, self.weight_scale, self.block, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.block, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8 e4m3, {self.block}x{self.block} tile scales"


def fp8_target_names(model: nn.Module, targets: Iterable[str] = FP8_TARGETS) -> list[str]:
    """Names of the plain nn.Linear modules the patterns fully match (already-fp8 ones left out)."""
    regexes = [re.compile(p) for p in targets]
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and any(r.fullmatch(name) for r in regexes)]


def quantize_linears(model: nn.Module, targets: Iterable[str] = FP8_TARGETS, block: int = BLOCK) -> list[str]:
    """Replace every targeted nn.Linear by an FP8Linear in place (one layer at a time, so the peak is one
    layer's float copy). Returns the names replaced. A model already quantized is left as it is."""
    names = fp8_target_names(model, targets)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, FP8Linear.from_linear(getattr(owner, attr), block))
    return names


def fp8_structure(model: nn.Module, fp8_names: Iterable[str], block: int = BLOCK) -> None:
    """Turn the named nn.Linear layers of a model built on the meta device into empty FP8Linear ones, so a
    state dict written by `quantize_state_dict` loads strictly into it (weights.load.load_into)."""
    for name in fp8_names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, attr)
        if type(old) is not nn.Linear:
            raise ValueError(f"{name} holds fp8 weights in the file but is a {type(old).__name__} "
                             "in the model")
        dtype = old.bias.dtype if old.bias is not None else None
        setattr(owner, attr, FP8Linear(old.in_features, old.out_features, old.bias is not None, device="meta",
                                       dtype=dtype, block=block))


def quantize_state_dict(state: dict[str, Tensor], names: Iterable[str],
                        block: int = BLOCK) -> dict[str, Tensor]:
    """A state dict with `{name}.weight` of each named linear replaced by its fp8 weight and a
    `{name}.weight_scale` beside it; every other tensor as it was."""
    out = dict(state)
    for name in names:
        out[f"{name}.weight"], out[f"{name}.weight_scale"] = quantize(state[f"{name}.weight"], block)
    return out


def fp8_names_in(state: dict[str, Tensor]) -> list[str]:
    """The layers a state dict stores in fp8: those with an fp8 `weight` and a `weight_scale`."""
    return [k[: -len(".weight")] for k, v in state.items()
            if k.endswith(".weight") and FP8 is not None and v.dtype == FP8 and f"{k}_scale" in state]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the block linears' weights (and their scales): what fp8 halves."""
    regexes = [re.compile(p) for p in FP8_TARGETS]
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(r.fullmatch(name) for r in regexes):
            total += m.weight.nelement() * m.weight.element_size()
            scale = getattr(m, "weight_scale", None)
            total += 0 if scale is None else scale.nelement() * scale.element_size()
    return total


__all__ = ["FP8", "BLOCK", "E4M3_MAX", "FP8_TARGETS", "FP8Linear", "check_fp8_available", "quantize",
           "dequantize", "fp8_linear", "quantize_linears", "fp8_structure", "quantize_state_dict",
           "fp8_names_in", "fp8_target_names", "linear_weight_bytes", "scale_shape"]
