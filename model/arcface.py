"""insightface's arcface_torch IResNet (r18, r34, r50, r100, ...), the network behind the paper's ID column.

Rebuilt here so that its plain state dict (e.g. the `backbone.pth` of an ms1mv3 or glint360k model)
loads strictly by key name (weights/arcface.py reads it).

Conventions the weights depend on:
- input (B, 3, 112, 112) RGB as (x / 255 - 0.5) / 0.5, i.e. [-1, 1] (insightface's inference);
- a block is bn1 -> conv1 -> bn2 -> prelu -> conv2 (carries the stride) -> bn3, plus the identity or a
  downsample (1x1 strided conv `downsample.0`, BatchNorm `downsample.1`); every BatchNorm has eps 1e-5;
- head: bn2 -> flatten channel-major (512 * 7 * 7) -> fc -> features (BatchNorm1d); the dropout
  insightface has before fc is the identity at inference and holds no weights, so it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

INPUT_SIZE = 112  # side of ArcFace's aligned crops
HEAD_SIDE = INPUT_SIZE // 16  # four stride-2 stages: the fc sees a 7x7 map
PLANES = (64, 128, 256, 512)  # channels of layer1..layer4
BN_EPS = 1e-5


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


__all__ = ["INPUT_SIZE", "IResNet", "IBasicBlock"]
