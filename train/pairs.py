"""Stitched pairs of two concepts in the base's own two-object geometry and caption grammar.

A stitched pair (paper §5.2.2, Fig. 8) puts two concepts' clips in one training video with a prompt
that names both, so each concept's tokens learn to act on its own object only. The pair should look
like the base's own two-object scenes, in the grammar the base's text encoder read in pretraining;
that is a property of the base, so it is a named layout here:

    side_by_side  (Wan; any base of natural-language captions) the two clips side by side, (H, 2W),
                  "On the left, <prompt 1> On the right, <prompt 2>"
    halves        (the toy base) one (H, W) frame, the first-named object in the left half and the
                  second in the right, "<subject 1> and <subject 2> on a <colour> background": each
                  clip is fitted into its half (`fit`) and the right clip's background keyed to the
                  left's (a flat toy background; the paper: "removing backgrounds ... helps")

Both orders of every pair are drawn (`ordered_pairs`), so each concept is trained in every slot the
composition prompt may name it in. Everything is built from the concepts' own videos: nothing here
renders. Video tensors (C, T, H, W) in [-1, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FITS = ("crop", "squeeze", "scale")
# A pixel belongs to the object when a channel differs from the background by more than this ([-1, 1]
# units: 0.1 = 13 / 255; the toy world's flat backgrounds differ from every sprite colour by far more).
FOREGROUND = 0.1


@dataclass(frozen=True)
class PairLayout:
    """How a base lays out two objects: the stitched clip's geometry and its prompt template."""

    name: str
    fit: str = "crop"  # halves only: how a (H, W) clip goes into a (H, W/2) half (see fit_half)

    def __post_init__(self) -> None:
        if self.name not in LAYOUTS:
            raise ValueError(f"pair layout {self.name!r} is not one of {LAYOUTS}")
        if self.fit not in FITS:
            raise ValueError(f"pair fit {self.fit!r} is not one of {FITS}")

    def video(self, left: Tensor, right: Tensor) -> Tensor:
        """Two concepts' videos (C, T, H, W) -> one stitched video; T = the shorter."""
        t = min(left.shape[1], right.shape[1])
        left, right = left[:, :t], right[:, :t]
        if self.name == "side_by_side":
            return torch.cat([left, right], dim=-1)  # (C, T, H, 2W)
        bg = background_colour(left)
        right = key_background(right, background_colour(right), bg)
        halves = [fit_half(left, self.fit, bg), fit_half(right, self.fit, bg)]  # (C, T, H, W/2) each
        return torch.cat(halves, dim=-1)

    def prompt(self, left: str, right: str) -> str:
        """The pair's prompt from the two concepts' prompts, in the base's grammar."""
        if self.name == "side_by_side":
            return f"On the left, {_lower_first(left)} On the right, {_lower_first(right)}"
        (subject_l, place), (subject_r, _) = split_caption(left), split_caption(right)
        return f"{subject_l} and {subject_r} {place}"


LAYOUTS = ("side_by_side", "halves")


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    """(left, right) concept indices: every ordered pair, so each concept is trained in both slots."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


# ------------------------------------------------------------------------------------------ grammar

_CAPTION = re.compile(r"^(?P<subject>.+?) (?P<place>on an? \S+ background)\.?$")


def split_caption(text: str) -> tuple[str, str]:
    """A toy caption "a [v] square moves [u] on a gray background" -> ("a [v] square moves [u]",
    "on a gray background"). Raises for a prompt outside that grammar."""
    m = _CAPTION.match(text.strip())
    if m is None:
        raise ValueError(f"prompt {text!r} is not in the toy base's caption grammar '<subject> on a <colour> "
                         "background' (pair layout 'halves'); write it so, or use pair layout 'side_by_side'")
    return m["subject"], m["place"]


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:] if text[:1].isupper() and text[1:2].islower() else text


# ----------------------------------------------------------------------------------------- geometry


def background_colour(video: Tensor) -> Tensor:
    """(C,) the median colour of the video's border pixels (a flat or near-flat background)."""
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    return border.flatten(1).median(dim=1).values


def foreground(video: Tensor, bg: Tensor) -> Tensor:
    """(T, H, W) bool: pixels unlike the background."""
    return (video - bg.view(-1, 1, 1, 1)).abs().amax(dim=0) > FOREGROUND


def key_background(video: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """The background pixels (near `old`) recoloured to `new`."""
    if torch.allclose(old, new):
        return video
    keep = foreground(video, old)[None]  # (1, T, H, W)
    return torch.where(keep, video, new.view(-1, 1, 1, 1).to(video.dtype))


def fit_half(video: Tensor, fit: str, bg: Tensor) -> Tensor:
    """(C, T, H, W) -> (C, T, H, W/2), the clip made to fit one half of the frame:

    crop     a W/2 window that follows the object, its x offsets from their mean shrunk until the
             object stays inside the half (the world draws a two-object scene so: `slot_path`); the
             object keeps its size and its y motion
    squeeze  the whole frame resized to half its width (the object narrowed, its x motion halved)
    scale    the whole frame at half size, padded above and below with the background
    """
    c, t, h, w = video.shape
    if fit == "squeeze":
        return F.interpolate(video.transpose(0, 1), size=(h, w // 2), mode="area").transpose(0, 1)
    if fit == "scale":
        small = F.interpolate(video.transpose(0, 1), size=(h // 2, w // 2), mode="area").transpose(0, 1)
        pad = bg.view(-1, 1, 1, 1).expand(c, t, h // 4, w // 2).to(video.dtype)
        return torch.cat([pad, small, pad.expand(c, t, h - h // 2 - h // 4, w // 2)], dim=2)
    return crop_half(video, bg)


def crop_half(video: Tensor, bg: Tensor) -> Tensor:
    """The `crop` fit: a per-frame window of width W/2 centred so that the object sits at
    W/4 + k (x - mean x), k <= 1 the largest scale that keeps its box inside the half."""
    c, t, h, w = video.shape
    half = w // 2
    fg = foreground(video, bg)  # (T, H, W)
    cols = torch.arange(w, dtype=torch.float32)
    seen = fg.any(dim=1)  # (T, W): columns holding object pixels
    found = seen.any(dim=1)  # (T,)
    if not bool(found.any()):  # no object at all: the centre window
        return video[..., (w - half) // 2 : (w - half) // 2 + half]
    centre = torch.where(found, (seen * cols).sum(1) / seen.sum(1).clamp(min=1), torch.nan)
    centre = _fill_gaps(centre)
    lo = torch.where(seen, cols, torch.inf).amin(1)
    hi = torch.where(seen, cols, -torch.inf).amax(1)
    reach = float(torch.max(torch.where(found, torch.maximum(centre - lo, hi - centre) + 0.5, 0.0)))
    off = centre - centre.mean()
    room = max(half / 2 - reach, 0.0)
    widest = float(off.abs().max())
    k = min(1.0, room / widest) if widest > 0 else 1.0
    left = torch.round(centre - (half / 2 + k * off)).long()  # (T,) window's first column
    padded = torch.cat([bg.view(-1, 1, 1, 1).expand(c, t, h, half).to(video.dtype), video,
                        bg.view(-1, 1, 1, 1).expand(c, t, h, half).to(video.dtype)], dim=-1)
    frames = [padded[:, i, :, half + int(left[i]) : 2 * half + int(left[i])] for i in range(t)]
    return torch.stack(frames, dim=1)


def _fill_gaps(x: Tensor) -> Tensor:
    """NaNs (frames without the object) take the nearest earlier value, else the first one found."""
    out = x.clone()
    first = out[~torch.isnan(out)][0]
    prev = first
    for i in range(len(out)):
        if torch.isnan(out[i]):
            out[i] = prev
        prev = out[i]
    return out
