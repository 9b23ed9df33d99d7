"""ArcFace identity similarity (the "ID" column of the Set-and-Sequence paper) from the user's own weights.

The network is insightface's arcface_torch IResNet (r18, r34, r50, r100, ...; e.g. the `backbone.pth` of
an ms1mv3 or glint360k model), rebuilt here so that its plain state dict loads strictly by key name.
Nothing is ever downloaded: `load_arcface` reads a file the user already has.

    ID = mean over generated frames t of cos(e_t, normalize(mean over reference frames r of e_r))

with e the L2-normalised embedding of a frame's crop.

Conventions the weights depend on:
- input (B, 3, 112, 112) RGB as (x / 255 - 0.5) / 0.5, i.e. [-1, 1] (insightface's inference);
- a block is bn1 -> conv1 -> bn2 -> prelu -> conv2 (carries the stride) -> bn3, plus the identity or a
  downsample (1x1 strided conv `downsample.0`, BatchNorm `downsample.1`); every BatchNorm has eps 1e-5;
- head: bn2 -> flatten channel-major (512 * 7 * 7) -> fc -> features (BatchNorm1d); the dropout
  insightface has before fc is the identity at inference and holds no weights, so it is left out.

LIMITATION: ArcFace was trained on detected, landmark-aligned face crops, and this project has no face
detector or aligner. A scorer crops a fixed `box` (fractions of width and height; the centred square of
the frame by default) from every frame and resizes it to 112x112. Scores are only meaningful when that
box holds a roughly aligned, upright face filling most of it (e.g. face-centred close-ups); on any other
framing the number says little about identity.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weights.io import read_state_dict
from weights.load import build_meta, expected_shapes, load_into

INPUT_SIZE = 112  # side of ArcFace's aligned crops
HEAD_SIDE = INPUT_SIZE // 16  # four stride-2 stages: the fc sees a 7x7 map
PLANES = (64, 128, 256, 512)  # channels of layer1..layer4
BN_EPS = 1e-5
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width and height
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")  # layerN.K. -> stage N, block K
_FORMAT_HINT = ("the file must be an insightface arcface_torch IResNet backbone "
                "(e.g. backbone.pth of an ms1mv3 or glint360k r50/r100 model)")


# ------------------------------------------------------------------------------------------ network


class IBasicBlock(nn.Module):
    """insightface's residual block: (B, Cin, H, W) -> (B, planes, H / stride, W / stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = _downsample(inplanes, planes, stride) if stride != 1 or inplanes != planes else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


def _downsample(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes, eps=BN_EPS))


def _stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """The first block halves the resolution (and so always has a downsample); the rest keep it."""
    return nn.Sequential(IBasicBlock(inplanes, planes, 2), *(IBasicBlock(planes, planes, 1)
                                                             for _ in range(blocks - 1)))


class IResNet(nn.Module):
    """insightface arcface_torch IResNet: (B, 3, 112, 112) in [-1, 1] -> (B, num_features), not normalised.

    layers: blocks per stage, e.g. [3, 4, 14, 3] (r50) or [3, 13, 30, 3] (r100). Eval use only; the
    initialisation is torch's default, since real weights always come from `load_arcface`.
    """

    def __init__(self, layers: Sequence[int], num_features: int = 512):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of at least one block each; got layers={list(layers)}")
        self.conv1 = nn.Conv2d(3, PLANES[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(PLANES[0], eps=BN_EPS)
        self.prelu = nn.PReLU(PLANES[0])
        self.layer1 = _stage(PLANES[0], PLANES[0], layers[0])
        self.layer2 = _stage(PLANES[0], PLANES[1], layers[1])
        self.layer3 = _stage(PLANES[1], PLANES[2], layers[2])
        self.layer4 = _stage(PLANES[2], PLANES[3], layers[3])
        self.bn2 = nn.BatchNorm2d(PLANES[3], eps=BN_EPS)
        self.fc = nn.Linear(PLANES[3] * HEAD_SIDE**2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"IResNet takes (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) RGB in [-1, 1]; "
                             f"got shape {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 7, 7)
        x = self.bn2(x).flatten(1)  # (B, 512 * 7 * 7), channel-major as the fc weights expect
        return self.features(self.fc(x))  # (B, D)


# ------------------------------------------------------------------------------------------ loading


def load_arcface(path: str | os.PathLike, device: torch.device | str = "cpu") -> IResNet:
    """The IResNet in a local .pth or .safetensors file, depth and embedding size read from its keys;
    loaded strictly, in eval mode, frozen, float32 (even from a half-precision file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace weights not found at {path}: pass the path of a local insightface "
                                "arcface_torch backbone (.pth or .safetensors); nothing is downloaded")
    state = _strip_module_prefix(read_state_dict(path))
    layers, num_features = _infer_config(state, path)
    build = partial(IResNet, layers, num_features)
    state = _with_bn_counters(state, expected_shapes(build_meta(build)))
    try:
        model = load_into(build, state, device=device, source=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; {_FORMAT_HINT}") from None
    return model.requires_grad_(False)


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DataParallel saves every key as `module.<name>`; strip the prefix only when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _infer_config(state: Mapping[str, Tensor], path: Path) -> tuple[list[int], int]:
    """Blocks per stage from the `layerN.K.` keys; embedding size from fc.weight (D, 512 * 7 * 7)."""
    blocks = [0, 0, 0, 0]
    for key in state:
        if m := _BLOCK_KEY.match(key):
            stage, index = int(m[1]) - 1, int(m[2])
            blocks[stage] = max(blocks[stage], index + 1)
    if 0 in blocks or "fc.weight" not in state:
        raise ValueError(f"{path}: cannot infer the IResNet shape (blocks per stage found: {blocks}; "
                         f"'fc.weight' {'present' if 'fc.weight' in state else 'missing'}); {_FORMAT_HINT}")
    return blocks, state["fc.weight"].shape[0]


def _with_bn_counters(state: dict[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """num_batches_tracked is training bookkeeping that eval never reads: files may lack it."""
    counters = {k for k in expected if k.endswith(".num_batches_tracked")} - state.keys()
    return {**state, **{k: torch.zeros((), dtype=torch.long) for k in counters}}


# ------------------------------------------------------------------------------------------ scoring


def face_embeddings(model: IResNet, frames: np.ndarray, box: Box | None = None, batch: int = 16) -> Tensor:
    """L2-normalised embeddings (T, D), float32 on the CPU, of the `box` crop of uint8 frames (T, H, W, 3).

    box: (x0, y0, x1, y1) as fractions of width and height; None = the centred square of the frame.
    """
    _check_frames(frames)
    box = None if box is None else check_box(box)
    if batch < 1:
        raise ValueError(f"batch must be at least 1; got {batch}")
    device = next(model.parameters()).device
    crops = _crop(frames, box)  # (T, h, w, 3)
    out = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch):
            x = _network_input(crops[start:start + batch], device)  # (B, 3, 112, 112)
            out.append(F.normalize(model(x).float(), dim=-1).cpu())  # (B, D)
    return torch.cat(out)


class ArcFaceScorer:
    """The paper's ID as a `face_scorer` for sample/metrics.score_video: (frames, reference frames) -> float.

    Mean over the generated frames of the cosine between each frame's embedding and the normalised mean
    of the reference frames' embeddings; the same box crops both videos (see the module's LIMITATION).
    """

    def __init__(self, model: IResNet, box: Box | None = None):
        self.model = model
        self.box = None if box is None else check_box(box)

    def __call__(self, frames: np.ndarray, reference_frames: np.ndarray) -> float:
        emb = face_embeddings(self.model, frames, self.box)  # (T, D)
        centre = F.normalize(face_embeddings(self.model, reference_frames, self.box).mean(0), dim=0)  # (D,)
        return float((emb @ centre).mean())


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3 or len(frames) == 0:
        what = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) \
            else type(frames).__name__
        raise ValueError(f"ArcFace scoring takes uint8 frames (T, H, W, 3) with T >= 1; got a {what}")


def check_box(box: Sequence[float]) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise ValueError(f"box must be four numbers (x0, y0, x1, y1), fractions of width and height; "
                         f"got {box!r}") from e
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box {box!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                         "(x0, y0, x1, y1: left, top, right, bottom as fractions of width and height)")
    return x0, y0, x1, y1


def _crop(frames: np.ndarray, box: Box | None) -> np.ndarray:
    """The box of every frame, (T, h, w, 3); the centred square when box is None."""
    _, h, w, _ = frames.shape
    if box is None:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return frames[:, top:top + side, left:left + side]
    x0, y0, x1, y1 = box
    (left, right), (top, bottom) = _span(x0, x1, w), _span(y0, y1, h)
    return frames[:, top:bottom, left:right]


def _span(a: float, b: float, n: int) -> tuple[int, int]:
    """Pixels [start, stop) of the fractions [a, b) of n pixels; at least one pixel wide."""
    start = min(round(a * n), n - 1)
    return start, max(start + 1, round(b * n))


def _network_input(crops: np.ndarray, device: torch.device) -> Tensor:
    """uint8 crops (B, h, w, 3) -> (B, 3, 112, 112) float in [-1, 1], as insightface's inference feeds it."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float()  # (B, 3, h, w)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x / 255 - 0.5) / 0.5
