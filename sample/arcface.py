"""ArcFace identity similarity (the "ID" column of the Set-and-Sequence paper) with a given IResNet.

    ID = mean over generated frames t of cos(e_t, normalize(mean over reference frames r of e_r))

with e the L2-normalised embedding of a frame's crop; the network is model/arcface.IResNet, loaded by
weights/arcface.load_arcface.

LIMITATION: ArcFace was trained on detected, landmark-aligned face crops, and this project has no face
detector or aligner. A scorer crops a fixed `box` (fractions of width and height; the centred square of
the frame by default) from every frame and resizes it to 112x112. Scores are only meaningful when that
box holds a roughly aligned, upright face filling most of it (e.g. face-centred close-ups); on any other
framing the number says little about identity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lora.regions import check_box
from model.arcface import INPUT_SIZE, IResNet

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width and height


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


__all__ = ["Box", "face_embeddings", "ArcFaceScorer"]
