"""Dynamic concepts of the toy world: sprites and motions its vocabulary cannot name.

A concept is an appearance (a two-colour checker, stripes or a split disc, cells of 8 px so a
pattern is never finer than one latent cell of the tiny VAE) moving in a motion no caption
names (figure-eight, hop-and-spin, stutter). None appears in pretraining, so only
personalization can learn one. Concepts are small TOML files; several ship in
examples/concepts/ and load by name:

    spec = load_concept("checker_eight")
    clip = render_concept(spec, seed=0)                                   # the training video
    edit = render_concept(spec, background="blue", extra=("red", "square", "up"))  # an edit target

Rendering with `extra` draws a two-object scene as the world's captions lay one out: the sprite (named
first) in the left half on its path shrunk to fit there (`slot_path`), the ordinary object in the right.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    Clip,
    Layer,
    ObjectTruth,
    ToyWorldConfig,
    caption_of,
    draw_layers,
    motion_offsets,
    path_time,
)

CONCEPT_MOTIONS: tuple[str, ...] = ("figure_eight", "hop_spin", "stutter")
PATTERNS: tuple[str, ...] = ("solid", "checker", "stripes", "split")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "concepts"


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    pattern: str  # one of PATTERNS
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]  # RGB of pattern cells 0 and 1
    shape: str = "square"  # one of SHAPES
    radius: float = 12.0  # box half-size: 24 px, three 8 px cells
    cell: float = 8.0
    motion: str = "figure_eight"  # a CONCEPT_MOTIONS name, or a vocabulary motion
    # Path size (px), see concept_offsets. 12 keeps the fastest step near 5-7 px a frame (an
    # eight must be traced within 17 frames); the stutter's bursts cover 1.5x this.
    amplitude: float = 12.0
    background: str = "gray"
    description: str = ""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"concept {self.name!r}: pattern {self.pattern!r} is not one of {PATTERNS}")
        if self.shape not in SHAPES:
            raise ValueError(f"concept {self.name!r}: shape {self.shape!r} is not one of {SHAPES}")
        if self.motion not in CONCEPT_MOTIONS + MOTIONS:
            raise ValueError(f"concept {self.name!r}: motion {self.motion!r} is not one of "
                             f"{CONCEPT_MOTIONS + MOTIONS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"concept {self.name!r}: background {self.background!r} is not one of "
                             f"{tuple(BACKGROUNDS)}")
        if len(self.colours) != 2 or any(len(c) != 3 or not all(0 <= x <= 255 for x in c)
                                         for c in self.colours):
            raise ValueError(f"concept {self.name!r}: colours must be two [r, g, b] triples in 0..255, "
                             f"got {self.colours}")
        if self.pattern != "solid" and self.cell < 8:
            raise ValueError(f"concept {self.name!r}: cell={self.cell} px is finer than one 8 px latent cell")


def concept_prompt(spec: ConceptSpec, *, motion: bool = True, background: str | None = None,
                   extra: tuple[str, str, str] | None = None, appearance_token: str = "[v]",
                   motion_token: str = "[u]") -> str:
    """Static "a [v] sprite on a gray background"; with motion "a [v] sprite moving in [u] motion
    on a gray background"; `extra` adds "... and a red square moves up ..." before the background."""
    subject = f"a {appearance_token} sprite"
    if motion:
        subject += f" moving in {motion_token} motion"
    bg = background or spec.background
    if extra is None:
        return f"{subject} on a {bg} background"
    return f"{subject} and {caption_of(bg, [extra])}"


def load_concept(name_or_path: str | Path) -> ConceptSpec:
    """A concept by example name (examples/concepts/<name>.toml) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = EXAMPLES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no concept file {path}; shipped examples: {', '.join(list_concepts())}")
    with path.open("rb") as f:
        data = tomllib.load(f)
    data.setdefault("name", path.stem)
    data["colours"] = tuple(tuple(int(x) for x in c) for c in data.get("colours", ()))
    try:
        return ConceptSpec(**data)
    except TypeError as err:  # unknown or missing keys
        raise ValueError(f"concept file {path}: {err}") from None


def list_concepts() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.toml"))


def concept_offsets(motion: str, s: np.ndarray, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from the frame centre (T, 2) and rotation angles (T,) for a concept motion.

    figure_eight: x = A sin(2 pi s), y = A/2 sin(4 pi s), one loop of the eight per half clip.
    hop_spin: two hops of height A in place (y = A/2 - A |sin(2 pi s)|) while turning once.
    stutter: moves right 1.5 A px in two bursts: half of each period moving, half holding;
        with 17 frames a period is 8 frames, two latent frames of the tiny VAE.
    """
    angles = np.zeros_like(s)
    off = np.zeros((len(s), 2))
    if motion == "figure_eight":
        off[:, 0] = amplitude * np.sin(2 * np.pi * s)
        off[:, 1] = amplitude / 2 * np.sin(4 * np.pi * s)
    elif motion == "hop_spin":
        off[:, 1] = amplitude / 2 - amplitude * np.abs(np.sin(2 * np.pi * s))
        angles = 2 * np.pi * s
    elif motion == "stutter":
        phase = 2 * s  # two periods
        progress = (np.floor(phase) + np.minimum(2 * (phase % 1), 1.0)) / 2  # 0 -> 1 in two bursts
        travel = 1.5 * amplitude
        off[:, 0] = (progress - 0.5) * travel
    else:
        raise ValueError(f"unknown concept motion {motion!r}; use one of {CONCEPT_MOTIONS}")
    return off, angles


def concept_path(spec: ConceptSpec, cfg: ToyWorldConfig, motion: str | None = None):
    """Centre path (T, 2) and angles (T,) of the sprite, before jitter."""
    motion = motion or spec.motion
    s = path_time(cfg.frames)
    if motion in MOTIONS:
        off = motion_offsets(np.array([MOTIONS.index(motion)]), s, cfg.travel, cfg.orbit_radius)[0]
        angles = np.zeros_like(s)
    else:
        off, angles = concept_offsets(motion, s, spec.amplitude)
    return off + cfg.size / 2, angles


def slot_path(spec: ConceptSpec, cfg: ToyWorldConfig, slot_x: float, motion: str | None = None):
    """The sprite's path in one slot of a two-object scene (centre x = slot_x, e.g. W/4 for the
    caption's first object): the world's two-object grammar keeps each object in its own half, so the
    x offsets shrink until the sprite fits there. Returns centres (T, 2) and angles (T,)."""
    centres, angles = concept_path(spec, cfg, motion)
    off = centres - cfg.size / 2
    reach = spec.radius * (np.sqrt(2) if spec.shape == "square" and np.ptp(angles) > 0 else 1.0)
    room = max(cfg.size / 4 - reach, 0.0)
    widest = float(np.abs(off[:, 0]).max())
    if widest > room:
        off[:, 0] *= room / widest
    return off + np.array([slot_x, cfg.size / 2]), angles


def render_concept(spec: ConceptSpec, *, seed: int = 0, n: int = 1, cfg: ToyWorldConfig | None = None,
                   background: str | None = None, motion: str | None = None,
                   extra: tuple[str, str, str] | None = None) -> list[Clip]:
    """n clips of the concept (start jitter drawn from `seed`). `background` and `motion` override
    the spec's; `extra` = (colour, shape, motion) vocabulary names of an ordinary second object.
    Object 0 of each clip is the sprite; object 1 the extra object."""
    cfg = cfg or ToyWorldConfig()
    bg = background or spec.background
    if bg not in BACKGROUNDS:
        raise ValueError(f"background {bg!r} is not one of {tuple(BACKGROUNDS)}")
    rng = np.random.default_rng(seed)
    centres, angles = concept_path(spec, cfg, motion)
    reach = spec.radius * (np.sqrt(2) if spec.shape == "square" else 4 / 3) + cfg.jitter  # any rotation
    if centres.min() - reach < 0 or centres.max() + reach > cfg.size:
        raise ValueError(f"concept {spec.name!r} leaves the {cfg.size}px frame (path spans "
                         f"{centres.min():.1f}..{centres.max():.1f} px, sprite reach {reach:.1f}); "
                         "lower its amplitude or radius")
    if extra is not None:  # the caption names the sprite first: the left slot, as the world draws pairs
        centres, angles = slot_path(spec, cfg, cfg.size / 4, motion)
    jit = rng.uniform(-cfg.jitter, cfg.jitter, (n, 2, 1, 2))
    sprite = Layer(centres=centres[None] + jit[:, 0], shapes=np.full(n, SHAPES.index(spec.shape)),
                   colours=np.broadcast_to(np.array(spec.colours, np.uint8), (n, 2, 3)), radius=spec.radius,
                   pattern=spec.pattern, cell=spec.cell, angles=np.broadcast_to(angles, (n, cfg.frames)))
    layers = [sprite]
    if extra is not None:
        layers.insert(0, _extra_layer(extra, cfg, n, jit[:, 1]))
    bg_rgb = np.broadcast_to(np.array(BACKGROUNDS[bg], np.uint8), (n, 3))
    video, labels = draw_layers(bg_rgb, layers, cfg.frames, cfg.size)
    caption = concept_prompt(spec, background=bg, extra=extra, motion=True)
    clips = []
    for i in range(n):
        # labels: 1 + layer index; the sprite is the last layer drawn
        sprite_label = len(layers)
        objs = [ObjectTruth(colour=None, shape=spec.shape, motion=motion or spec.motion,
                            rgb=np.array(spec.colours[0], np.uint8), positions=sprite.centres[i],
                            masks=labels[i] == sprite_label, pattern=spec.pattern,
                            colours=np.array(spec.colours, np.uint8), angles=np.asarray(angles),
                            concept=spec.name)]
        if extra is not None:
            objs.append(ObjectTruth(colour=extra[0], shape=extra[1], motion=extra[2],
                                    rgb=np.array(COLOURS[extra[0]], np.uint8), positions=layers[0].centres[i],
                                    masks=labels[i] == 1))
        clips.append(Clip(video=video[i], caption=caption, background=bg,
                          background_rgb=np.array(BACKGROUNDS[bg], np.uint8), objects=objs, split="concept"))
    return clips


def _extra_layer(extra: tuple[str, str, str], cfg: ToyWorldConfig, n: int, jit: np.ndarray) -> Layer:
    colour, shape, motion = extra
    for value, vocab, what in ((colour, tuple(COLOURS), "colour"), (shape, SHAPES, "shape"),
                               (motion, MOTIONS, "motion")):
        if value not in vocab:
            raise ValueError(f"extra object {what} {value!r} is not one of {vocab}")
    s = path_time(cfg.frames)
    off = motion_offsets(np.array([MOTIONS.index(motion)]), s, cfg.pair_travel, cfg.pair_orbit_radius)[0]
    centres = off + np.array([3 * cfg.size / 4, cfg.size / 2]) + jit  # (n, T, 2)
    rgb = np.array(COLOURS[colour], np.uint8)
    return Layer(centres=centres, shapes=np.full(n, SHAPES.index(shape)),
                 colours=np.broadcast_to(rgb, (n, 2, 3)), radius=cfg.radius)

