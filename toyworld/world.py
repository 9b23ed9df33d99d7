"""The toy world: a seeded generator of short captioned videos with per-frame ground truth.

A scene is a flat background and one or two solid objects (circle, square, triangle) that move
along a path named by the caption: "a red circle moves left on a blue background", or
"a red circle moves left and a cyan square moves up on a gray background". Everything a caption
does not name (start jitter) is small, so a caption nearly determines its video.

Sizes, and why (the tiny model must learn this world on a CPU):
- 17 frames of 64x64 (frames = 1 + 4k). The `tiny` VAE compresses 4x in time and 8x in space,
  so a clip is a 5x8x8 latent, 80 tokens after 1x2x2 patches: few tokens, many cheap steps.
  9 frames of 32x32 would give 12 tokens but a 4x4 latent, where an object is one latent cell
  and a pattern on it is finer than a cell; `ToyWorldConfig(frames=9, size=32, ...)` remains
  possible for smoke tests.
- Objects of radius 10 (a 20 px box, 2.5 latent cells; concept sprites 24 px, 3 cells) with
  concept patterns of 8 px cells: nothing that must be learned is finer than one latent cell.
- Start positions are fixed per (motion, slot) up to +-1 px jitter; a linear motion travels
  24 px (1.5 px a frame, 6 px per latent frame), an orbit has radius 12 and turns once (4.7 px
  a frame, a quarter turn per latent frame); paths are centred on the slot, so the first frame
  already says where the object goes.
- Shapes are hard-edged (no anti-aliasing): a mask pixel has exactly the object's colour, and a
  mask centroid is within 0.5 px (per axis) of the reported position.
- Two-object scenes keep the first-named object in the left half and the second in the right
  half (centres x = 16 and 48, travel 10 px, orbit radius 5): they can never touch, so the
  visible masks are the full masks and instruments may split the frame at its middle.
- Vocabulary: 5 backgrounds x 5 object colours x 3 shapes x 6 motions. Background and object
  colours have disjoint names and well-separated RGB so "colour" is never ambiguous.

Held-out captions: the combination (background, colour, shape, motion) is held out when the
sum of its vocabulary indices is 0 mod 7 (two objects: a weighted sum, see `split_of`): 66 of
the 450 one-object compositions. Every word, pair and triple of words is still seen in training.

Speed: about 0.5-1.4k clips/s at 17x64x64 and ~8k clips/s at 9x32x32 in one numpy process on
a shared 2-core CPU (see tests/test_toyworld.py::test_generation_speed_is_reported).

Dynamic concepts (patterns and motions the vocabulary cannot name) live in `toyworld_concepts`.

Shape alphabet: B clips, K objects, T frames, H, W pixels; frames are (T, H, W, 3) uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model.config import PRESETS, ModelConfig

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "blue": (30, 60, 160),
    "green": (30, 120, 50),
    "brown": (110, 70, 40),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Motion names are shared with toyworld/instruments.py (`classify_motion` returns these strings).
MOTIONS: tuple[str, ...] = ("still", "left", "right", "up", "down", "clockwise")
MOTION_PHRASES: dict[str, str] = {
    "still": "stays still", "left": "moves left", "right": "moves right",
    "up": "moves up", "down": "moves down", "clockwise": "orbits clockwise",
}
SPLITS = ("train", "heldout")
# The boxes (x0, y0, x1, y1, fractions of the frame) of a two-object scene's first- and second-named object.
HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
_HELDOUT_MOD = 7


@dataclass(frozen=True)
class ToyWorldConfig:
    frames: int = 17  # 1 + 4k, so the tiny VAE's 4x time compression divides it
    size: int = 64  # square frames; a multiple of 16 (8x VAE compression, then 2x2 patches)
    radius: float = 10.0  # half-size of every shape's box (circle radius, square half-side)
    travel: float = 24.0  # length of a one-object linear path (px)
    orbit_radius: float = 12.0  # one-object "clockwise" orbit
    pair_travel: float = 10.0  # two-object scenes: each object stays in its half
    pair_orbit_radius: float = 5.0
    jitter: float = 1.0  # uniform +- start-position jitter (px)
    two_object_prob: float = 0.3

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"toy world frames={self.frames} must be 1 + 4k (e.g. 9 or 17) for the VAE")
        if self.size % 16:
            raise ValueError(f"toy world size={self.size} must be a multiple of 16 (VAE 8x, patch 2)")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob={self.two_object_prob} must lie in [0, 1]")
        reach = max(self.travel / 2, self.orbit_radius) + self.jitter + self.radius * 4 / 3
        if self.size / 2 - reach < 0:
            raise ValueError(f"objects leave the {self.size}px frame (reach {reach:.1f} px from the centre); "
                             "lower radius/travel/orbit_radius")
        pair_reach = max(self.pair_travel / 2, self.pair_orbit_radius) + self.jitter + self.radius
        if pair_reach > self.size / 4:
            raise ValueError(f"two-object scenes overlap: each object reaches {pair_reach:.1f} px from its "
                             f"slot centre but a half-frame slot allows {self.size / 4:.1f}; "
                             "lower pair_travel or radius")


@dataclass
class ObjectTruth:
    """One object's ground truth. `colour` is a vocabulary name (None for concept sprites)."""

    colour: str | None
    shape: str
    motion: str
    rgb: np.ndarray  # (3,) uint8 primary colour; patterned sprites also have `colours`
    positions: np.ndarray  # (T, 2) float (x, y) area centroid in pixels (pixel i spans [i, i + 1))
    masks: np.ndarray  # (T, H, W) bool, visible pixels
    pattern: str = "solid"
    colours: np.ndarray | None = None  # (2, 3) uint8 pattern colours
    angles: np.ndarray | None = None  # (T,) radians, sprite rotation
    concept: str | None = None


@dataclass
class Clip:
    video: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    background: str
    background_rgb: np.ndarray  # (3,) uint8
    objects: list[ObjectTruth]
    split: str

    def attributes(self) -> dict:
        """The attributes a caption promises, as `sample.instruments.attribute_accuracy` takes them."""
        return {"background": self.background,
                "objects": [{"colour": o.colour, "shape": o.shape, "motion": o.motion} for o in self.objects]}


@dataclass
class Layer:
    """One object drawn over a batch of clips: where it is each frame and what it looks like."""

    centres: np.ndarray  # (B, T, 2) float area centroid (x, y)
    shapes: np.ndarray  # (B,) int index into SHAPES; -1 = no object in this clip
    colours: np.ndarray  # (B, 2, 3) uint8; solid objects use colours[:, 0]
    radius: float
    pattern: str = "solid"  # "solid" | "checker" | "stripes" | "split"
    cell: float = 8.0  # pattern cell (px)
    angles: np.ndarray | None = None  # (B, T) radians; None = upright


@dataclass
class Scenes:
    """Sampled vocabulary indices for B clips; object slot 1 is unused where `two` is False."""

    background: np.ndarray  # (B,) int
    colour: np.ndarray  # (B, 2) int
    shape: np.ndarray  # (B, 2) int
    motion: np.ndarray  # (B, 2) int
    two: np.ndarray  # (B,) bool
    jitter: np.ndarray  # (B, 2, 2) float start offsets (x, y)


@dataclass
class ToyBatch:
    video: np.ndarray  # (B, T, H, W, 3) uint8
    labels: np.ndarray  # (B, T, H, W) uint8: 0 background, 1 + k where object slot k is visible
    positions: np.ndarray  # (B, K, T, 2) float, K = 2 (slot 1 unused in one-object clips)
    captions: list[str]
    scenes: Scenes
    split: str

    @property
    def masks(self) -> np.ndarray:
        """(B, K, T, H, W) bool visible masks."""
        k = self.positions.shape[1]
        return self.labels[:, None] == np.arange(1, k + 1, dtype=np.uint8)[None, :, None, None, None]

    def clips(self) -> list[Clip]:
        return [_clip_of(self, i) for i in range(len(self.captions))]


# ---------------------------------------------------------------------------------------------
# Captions and the held-out split


def caption_of(background: str, objects: list[tuple[str, str, str]]) -> str:
    """objects: (colour, shape, motion) names, first-named object in the left slot."""
    parts = [f"a {c} {s} {MOTION_PHRASES[m]}" for c, s, m in objects]
    return f"{' and '.join(parts)} on a {background} background"


def split_of(background: int, colour, shape, motion) -> str:
    """The deterministic split of one composition, given vocabulary indices (one per object)."""
    key = background + sum((k + 1) * (int(c) + int(s) + int(m))
                           for k, (c, s, m) in enumerate(zip(colour, shape, motion, strict=True)))
    return "heldout" if key % _HELDOUT_MOD == 0 else "train"


def _heldout_mask(sc: Scenes) -> np.ndarray:
    per_obj = sc.colour + sc.shape + sc.motion  # (B, 2)
    key = sc.background + per_obj[:, 0] + np.where(sc.two, 2 * per_obj[:, 1], 0)
    return key % _HELDOUT_MOD == 0


# ---------------------------------------------------------------------------------------------
# Sampling


def _draw(rng: np.random.Generator, n: int, cfg: ToyWorldConfig) -> Scenes:
    colour = rng.integers(0, len(COLOURS), (n, 2))
    clash = colour[:, 1] == colour[:, 0]  # two objects never share a colour
    colour[clash, 1] = (colour[clash, 1] + rng.integers(1, len(COLOURS), clash.sum())) % len(COLOURS)
    return Scenes(background=rng.integers(0, len(BACKGROUNDS), n), colour=colour,
                  shape=rng.integers(0, len(SHAPES), (n, 2)), motion=rng.integers(0, len(MOTIONS), (n, 2)),
                  two=rng.random(n) < cfg.two_object_prob,
                  jitter=rng.uniform(-cfg.jitter, cfg.jitter, (n, 2, 2)))


def sample_scenes(n: int, rng: np.random.Generator, cfg: ToyWorldConfig, split: str = "train") -> Scenes:
    """Draw n scenes of one split by rejection (about 1 in 7 draws is held out)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    sc = _draw(rng, n, cfg)
    while True:
        bad = np.flatnonzero(_heldout_mask(sc) != (split == "heldout"))
        if bad.size == 0:
            return sc
        fresh = _draw(rng, bad.size, cfg)
        for name in ("background", "colour", "shape", "motion", "two", "jitter"):
            getattr(sc, name)[bad] = getattr(fresh, name)


# ---------------------------------------------------------------------------------------------
# Paths


def path_time(frames: int) -> np.ndarray:
    """s in [0, 1] for each frame: (T,)."""
    return np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)


def motion_offsets(motion: np.ndarray, s: np.ndarray, travel: float, orbit: float) -> np.ndarray:
    """Offsets from the slot centre for vocabulary motions: motion (B,) int, s (T,) -> (B, T, 2).

    Linear paths are centred on the slot (a "left" object starts right of it); "clockwise" starts
    at the top and turns once clockwise on screen (y points down).
    """
    ramp = (s - 0.5) * travel  # (T,)
    ang = 2 * np.pi * s
    table = np.zeros((len(MOTIONS), len(s), 2))
    table[MOTIONS.index("left"), :, 0] = -ramp
    table[MOTIONS.index("right"), :, 0] = ramp
    table[MOTIONS.index("up"), :, 1] = -ramp
    table[MOTIONS.index("down"), :, 1] = ramp
    table[MOTIONS.index("clockwise")] = np.stack([orbit * np.sin(ang), -orbit * np.cos(ang)], -1)
    return table[motion]


def scene_centres(sc: Scenes, cfg: ToyWorldConfig) -> np.ndarray:
    """Area-centroid path of each object slot: (B, 2, T, 2)."""
    s, mid = path_time(cfg.frames), cfg.size / 2
    one = motion_offsets(sc.motion[:, 0], s, cfg.travel, cfg.orbit_radius) + mid
    pair = [motion_offsets(sc.motion[:, k], s, cfg.pair_travel, cfg.pair_orbit_radius) for k in range(2)]
    pair[0] = pair[0] + np.array([cfg.size / 4, mid])
    pair[1] = pair[1] + np.array([3 * cfg.size / 4, mid])
    first = np.where(sc.two[:, None, None], pair[0], one)
    return np.stack([first, pair[1]], 1) + sc.jitter[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside-test in object coordinates centred on the area centroid (broadcasting arrays)."""
    if shape == 0:  # circle
        return u * u + v * v < r * r
    if shape == 1:  # square
        return (np.abs(u) < r) & (np.abs(v) < r)
    # triangle, apex up, base 2r wide, height 2r; its centroid sits 2/3 of the way down
    return (v < 2 * r / 3) & (2 * np.abs(u) < v + 4 * r / 3)


def _pattern_index(pattern: str, u: np.ndarray, v: np.ndarray, r: float, cell: float) -> np.ndarray | None:
    """Which of the two colours each pixel takes (None = all colour 0). Cells start at the box edge."""
    if pattern == "solid":
        return None
    if pattern == "checker":
        return (np.floor((u + r) / cell) + np.floor((v + r) / cell)) % 2 == 1
    if pattern == "stripes":
        return np.floor((u + r) / cell) % 2 == 1
    if pattern == "split":
        return v >= 0
    raise ValueError(f"unknown pattern {pattern!r}; use solid, checker, stripes or split")


def _local_coords(centres: np.ndarray, angles: np.ndarray | None, size: int):
    """Pixel-centre coordinates relative to each centre, rotated into the object frame."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, None, :] - centres[..., 0, None, None].astype(np.float32)  # (B, T, 1, W)
    dy = grid[None, None, :, None] - centres[..., 1, None, None].astype(np.float32)  # (B, T, H, 1)
    if angles is None:
        return dx, dy
    cos = np.cos(angles)[..., None, None].astype(np.float32)
    sin = np.sin(angles)[..., None, None].astype(np.float32)
    return cos * dx + sin * dy, -sin * dx + cos * dy  # (B, T, H, W) each


def draw_layers(background: np.ndarray, layers: list[Layer], frames: int, size: int):
    """Paint layers in order over flat backgrounds (B, 3) uint8.

    Returns video (B, T, H, W, 3) uint8 and a label map (B, T, H, W) uint8: 0 is background,
    1 + k is layer k where it is visible (a later layer hides an earlier one).
    """
    b = background.shape[0]
    code = np.zeros((b, frames, size, size), np.uint8)  # 0 bg, 1 + 2k + j: layer k in colour j
    palette = np.concatenate([background[:, None]] + [layer.colours for layer in layers], 1)  # (B, 1 + 2K, 3)
    for k, layer in enumerate(layers):
        u, v = _local_coords(layer.centres, layer.angles, size)
        for shape in np.unique(layer.shapes[layer.shapes >= 0]):
            idx = np.flatnonzero(layer.shapes == shape)
            idx = slice(None) if idx.size == b else idx
            mask = _shape_mask(int(shape), u[idx], v[idx], layer.radius)  # (n, T, H, W)
            which = _pattern_index(layer.pattern, u[idx], v[idx], layer.radius, layer.cell)
            paint = 1 + 2 * k if which is None else (1 + 2 * k + which).astype(np.uint8)
            code[idx] = np.where(mask, paint, code[idx])
    video = np.empty(code.shape + (3,), np.uint8)
    for i in range(b):  # a per-clip take is ~4x faster than one fancy-indexed gather
        np.take(palette[i], code[i], axis=0, out=video[i])
    labels = (code + 1) // 2  # 0 bg, 1 + k for layer k
    return video, labels


def palette_array(names: dict[str, tuple[int, int, int]]) -> np.ndarray:
    return np.array(list(names.values()), np.uint8)


def render_scenes(sc: Scenes, cfg: ToyWorldConfig):
    """Video (B, T, H, W, 3) uint8, labels (B, T, H, W) uint8, positions (B, 2, T, 2)."""
    centres = scene_centres(sc, cfg)
    cols = palette_array(COLOURS)
    shapes = sc.shape.copy()
    shapes[~sc.two, 1] = -1  # one-object clips leave slot 1 empty
    layers = [Layer(centres=centres[:, k], shapes=shapes[:, k], radius=cfg.radius,
                    colours=np.repeat(cols[sc.colour[:, k]][:, None], 2, 1)) for k in range(2)]
    video, labels = draw_layers(palette_array(BACKGROUNDS)[sc.background], layers, cfg.frames, cfg.size)
    return video, labels, centres


def scene_captions(sc: Scenes) -> list[str]:
    bgs, cols = list(BACKGROUNDS), list(COLOURS)
    out = []
    for i in range(len(sc.background)):
        n = 2 if sc.two[i] else 1
        objs = [(cols[sc.colour[i, k]], SHAPES[sc.shape[i, k]], MOTIONS[sc.motion[i, k]]) for k in range(n)]
        out.append(caption_of(bgs[sc.background[i]], objs))
    return out


def generate_batch(n: int, seed: int = 0, split: str = "train", cfg: ToyWorldConfig | None = None,
                   chunk: int = 64) -> ToyBatch:
    """n clips of one split, deterministic in (n, seed, split, cfg). Rendered `chunk` clips at a time."""
    cfg = cfg or ToyWorldConfig()
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one clip")
    sc = sample_scenes(n, np.random.default_rng(seed), cfg, split)
    parts = [render_scenes(_take(sc, slice(i, i + chunk)), cfg) for i in range(0, n, chunk)]
    video, labels, pos = (np.concatenate(p, 0) for p in zip(*parts, strict=True))
    return ToyBatch(video=video, labels=labels, positions=pos, captions=scene_captions(sc), scenes=sc,
                    split=split)


def generate(n: int, seed: int = 0, split: str = "train", cfg: ToyWorldConfig | None = None) -> list[Clip]:
    return generate_batch(n, seed, split, cfg).clips()


def _take(sc: Scenes, idx) -> Scenes:
    names = ("background", "colour", "shape", "motion", "two", "jitter")
    return Scenes(**{k: getattr(sc, k)[idx] for k in names})


def _clip_of(batch: ToyBatch, i: int) -> Clip:
    sc, cols = batch.scenes, palette_array(COLOURS)
    objects = []
    for k in range(2 if sc.two[i] else 1):
        objects.append(ObjectTruth(colour=list(COLOURS)[sc.colour[i, k]], shape=SHAPES[sc.shape[i, k]],
                                   motion=MOTIONS[sc.motion[i, k]], rgb=cols[sc.colour[i, k]],
                                   positions=batch.positions[i, k], masks=batch.labels[i] == k + 1))
    bg = list(BACKGROUNDS)[sc.background[i]]
    return Clip(video=batch.video[i], caption=batch.captions[i], background=bg,
                background_rgb=np.array(BACKGROUNDS[bg], np.uint8), objects=objects, split=batch.split)


# ---------------------------------------------------------------------------------------------
# Model-facing tensors


def to_model_video(video: np.ndarray) -> torch.Tensor:
    """uint8 frames (B, T, H, W, 3) or (T, H, W, 3) -> float32 (B, C, T, H, W) in [-1, 1]."""
    if video.dtype != np.uint8:
        raise ValueError(f"to_model_video expects uint8 frames, got {video.dtype}")
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"to_model_video expects (B, T, H, W, 3) frames, got shape {video.shape}")
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


def from_model_video(x: torch.Tensor) -> np.ndarray:
    """float (B, C, T, H, W) in [-1, 1] -> uint8 frames (B, T, H, W, 3), clamped and rounded."""
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"from_model_video expects (B, 3, T, H, W), got shape {tuple(x.shape)}")
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 4, 1).cpu().numpy()


def latent_tokens(cfg: ToyWorldConfig, model: ModelConfig = PRESETS["tiny"]) -> int:
    """Tokens per clip of the world on a base (17x64x64 on tiny -> 80)."""
    return math.prod(model.token_grid(cfg.frames, (cfg.size, cfg.size)))
