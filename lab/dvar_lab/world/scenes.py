"""A small synthetic image world: one (or two nested) coloured shapes on a background.

Every image is described exactly by a :class:`Scene` (shape, colour, pattern, size,
position, background and an optional inner object), so generated images can be checked
attribute by attribute with :class:`dvar_lab.world.AttributeClassifier`.

Example:
    >>> from dvar_lab.world import Scene, render
    >>> scene = Scene("circle", "red", "striped", "small", "left", "green")
    >>> scene.caption()
    'a small red striped circle on the left, on a green background'
    >>> render(scene, rng=0).size
    (64, 64)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "BACKGROUND_CONFLICTS",
    "COLORS",
    "FULL_TEMPLATES",
    "HELD_OUT",
    "INNER_SHAPES",
    "PATTERNS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "Scene",
    "SceneDataset",
    "is_held_out",
    "render",
    "sample_scene",
    "sample_scenes",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
BACKGROUNDS: tuple[str, ...] = ("gray", "beige", "blue", "green", "grass", "brick")
#: Shapes that can be nested inside another one (a ring's hole makes it unreadable when small).
INNER_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s != "ring")

#: The per-attribute vocabularies, in label-index order (the classifier heads use this order).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "pattern": PATTERNS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

RGB = tuple[int, int, int]

_COLOR_RGB: dict[str, RGB] = {
    "red": (215, 30, 35),
    "green": (30, 160, 55),
    "blue": (35, 65, 215),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 175),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
# Pattern marks use a tint (or, for light colours, a shade) of the fill colour, so a
# patterned object still reads as one colour.
_DARKEN_INK = frozenset({"yellow", "white"})

_BACKGROUND_RGB: dict[str, RGB] = {
    "gray": (150, 150, 150),
    "beige": (228, 208, 168),
    "blue": (125, 170, 228),
    "green": (150, 205, 140),
    "grass": (70, 140, 55),
    "brick": (165, 78, 52),
}

#: Object colours that are never drawn on a given background (too little contrast).
BACKGROUND_CONFLICTS: dict[str, frozenset[str]] = {
    "gray": frozenset(),
    "beige": frozenset({"white", "yellow"}),
    "blue": frozenset({"blue"}),
    "green": frozenset({"green"}),
    "grass": frozenset({"green"}),
    "brick": frozenset({"red", "orange"}),
}

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}

#: Caption templates. ``{object}`` is the object phrase (or ``{}`` in prompts for a concept).
TEMPLATES: tuple[str, ...] = (
    "a {size} {object} {position}, on a {background} background",
    "a photo of a {size} {object} {position}, on a {background} background",
    "a {background} background with a {size} {object} {position}",
    "{position}, a {size} {object} on a {background} background",
    "a picture of a {size} {object} on a {background} background, {position}",
    "a rendering of a {size} {object}, {position}, {background} background",
    # Short templates, as used by Textual Inversion / DreamBooth training prompts.
    "a photo of a {object}",
    "a rendering of a {object}",
)
#: Indices of the templates that mention every attribute.
FULL_TEMPLATES: tuple[int, ...] = tuple(i for i, t in enumerate(TEMPLATES) if "{background}" in t)


def _held_out_rule(color: str, pattern: str, shape: str) -> bool:
    return (COLORS.index(color) + PATTERNS.index(pattern) + SHAPES.index(shape)) % 4 == 0


#: (color, pattern, shape) objects that never appear in pretraining scenes, neither alone
#: nor as the outer object of a composite: the 64 of the 256 combinations whose vocabulary
#: indices sum to a multiple of 4. That is one pattern per (color, shape) pair, two shapes per
#: (color, pattern) and two colours per (pattern, shape), so every word and every pair of words
#: is still seen in pretraining; only the triple is new. The personalization
#: concepts are drawn from this set, which makes them genuinely novel to the pretrained model.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (c, p, s) for c, p, s in itertools.product(COLORS, PATTERNS, SHAPES) if _held_out_rule(c, p, s)
)


def is_held_out(scene: Scene, held_out: Collection[tuple[str, str, str]] = HELD_OUT) -> bool:
    """Whether the scene's outer object is a held-out (color, pattern, shape) combination.

    Example:
        >>> is_held_out(Scene("circle", "red", "solid", "small", "left", "gray"))
        True
    """
    return scene.signature in held_out


@dataclass(frozen=True)
class Scene:
    """One object (optionally with a smaller solid object inside it) on a background.

    Example:
        >>> Scene("ring", "red", "dotted", "large", "center", "gray", "star", "blue").caption()
        'a large red dotted ring with a blue star inside in the center, on a gray background'
    """

    shape: str
    color: str
    pattern: str
    size: str
    position: str
    background: str
    inner_shape: Optional[str] = None
    inner_color: Optional[str] = None

    def __post_init__(self) -> None:
        for attr, values in ATTRIBUTES.items():
            if getattr(self, attr) not in values:
                raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; expected one of {values}")
        if self.color in BACKGROUND_CONFLICTS[self.background]:
            raise ValueError(f"a {self.color} object is not drawn on a {self.background} background")
        if (self.inner_shape is None) != (self.inner_color is None):
            raise ValueError("inner_shape and inner_color must be given together")
        if self.inner_shape is not None:
            if self.inner_shape not in INNER_SHAPES:
                raise ValueError(f"unknown inner_shape {self.inner_shape!r}; expected one of {INNER_SHAPES}")
            if self.inner_color not in COLORS or self.inner_color == self.color:
                raise ValueError(f"inner_color must be a colour other than {self.color!r}")
            # The inner object shows on the background inside a ring's hole.
            if self.inner_color in BACKGROUND_CONFLICTS[self.background]:
                raise ValueError(f"a {self.inner_color} object is not drawn on a {self.background} background")

    @property
    def is_composite(self) -> bool:
        """Whether there is a second (inner) object."""
        return self.inner_shape is not None

    @property
    def signature(self) -> tuple[str, str, str]:
        """The outer object's (color, pattern, shape), the unit of :data:`HELD_OUT`."""
        return (self.color, self.pattern, self.shape)

    def object_phrase(self, order: int = 0) -> str:
        """The noun phrase for the object; ``order=1`` puts the pattern before the colour.

        Example:
            >>> Scene("star", "blue", "dotted", "small", "right", "gray").object_phrase(order=1)
            'dotted blue star'
        """
        words = (self.color, self.pattern) if order == 0 else (self.pattern, self.color)
        phrase = f"{words[0]} {words[1]} {self.shape}"
        if self.is_composite:
            phrase += f" with {_article(self.inner_color)} {self.inner_color} {self.inner_shape} inside"
        return phrase

    def caption(self, template: int = 0, order: int = 0, object_phrase: Optional[str] = None) -> str:
        """Plain-English caption; ``object_phrase="{}"`` gives a prompt for a learned concept.

        Example:
            >>> s = Scene("circle", "red", "striped", "small", "left", "green")
            >>> s.caption(template=3, order=1)
            'on the left, a small striped red circle on a green background'
            >>> s.caption(template=1, object_phrase="{}")
            'a photo of a small {} on the left, on a green background'
        """
        return TEMPLATES[template].format(
            size=self.size,
            object=self.object_phrase(order) if object_phrase is None else object_phrase,
            position=_POSITION_PHRASE[self.position],
            background=self.background,
        )

    def labels(self) -> dict[str, int]:
        """Integer label per attribute (inner attributes are -1 when absent).

        Example:
            >>> Scene("square", "green", "solid", "large", "center", "gray").labels()["shape"]
            1
        """
        out = {attr: values.index(getattr(self, attr)) for attr, values in ATTRIBUTES.items()}
        out["inner_shape"] = -1 if self.inner_shape is None else INNER_SHAPES.index(self.inner_shape)
        out["inner_color"] = -1 if self.inner_color is None else COLORS.index(self.inner_color)
        return out

    def to_dict(self) -> dict[str, Optional[str]]:
        """Plain dict of the attributes (JSON-friendly)."""
        return asdict(self)


# --------------------------------------------------------------------------- sampling

SeedLike = Union[int, Sequence[int], np.random.Generator, None]


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_scene(
    rng: SeedLike,
    *,
    exclude: Collection[tuple[str, str, str]] = HELD_OUT,
    composite_prob: float = 0.2,
) -> Scene:
    """Draw one scene uniformly over the allowed attribute combinations.

    Example:
        >>> sample_scene(0).signature in HELD_OUT
        False
    """
    gen = _rng(rng)
    while True:
        shape, color, pattern, size, position, background = (
            values[gen.integers(len(values))] for values in ATTRIBUTES.values()
        )
        if (color, pattern, shape) in exclude or color in BACKGROUND_CONFLICTS[background]:
            continue
        inner_shape = inner_color = None
        if gen.random() < composite_prob:
            inner_shape = INNER_SHAPES[gen.integers(len(INNER_SHAPES))]
            inner_color = COLORS[gen.integers(len(COLORS))]
            if inner_color == color or inner_color in BACKGROUND_CONFLICTS[background]:
                continue
        return Scene(shape, color, pattern, size, position, background, inner_shape, inner_color)


def sample_scenes(
    n: int,
    seed: int,
    *,
    exclude: Collection[tuple[str, str, str]] = HELD_OUT,
    composite_prob: float = 0.2,
) -> list[Scene]:
    """``n`` scenes, deterministic in ``seed``; scene ``i`` is the same for every ``n``.

    Held-out objects (``exclude``, default :data:`HELD_OUT`) and low-contrast
    colour/background pairs are never drawn.

    Example:
        >>> sample_scenes(3, seed=0) == sample_scenes(5, seed=0)[:3]
        True
    """
    return [
        sample_scene((seed, i), exclude=exclude, composite_prob=composite_prob) for i in range(n)
    ]


# --------------------------------------------------------------------------- rendering

_SS = 4  # supersampling factor
_SMALL_RADIUS, _LARGE_RADIUS = 13.0, 20.0  # in output pixels at size 64
_INNER_SCALE = 0.4


def _regular(n: int, radius: float, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    angles = [start + 2 * math.pi * k / n for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.5, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
    return [(0.95 * float(a) / 16, -0.95 * (float(b) + 2.55) / 14.45) for a, b in zip(x, y)]


def _cross(t: float = 0.34, a: float = 0.9) -> list[tuple[float, float]]:
    return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]


# Unit-radius outlines in image orientation (y down); circles and rings are drawn as ellipses.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(x, y + 0.275) for x, y in _regular(3, 1.1)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
}
_CIRCLE_R, _RING_INNER_R = 0.93, 0.5
# Where a nested object sits, relative to the outer object's centre (unit radius).
_INNER_OFFSET: dict[str, tuple[float, float]] = {"triangle": (0.0, 0.2), "heart": (0.0, -0.08)}


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, side: int) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with radius ``r`` (all in canvas pixels)."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    if shape in ("circle", "ring"):
        rr = _CIRCLE_R * r
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        if shape == "ring":
            ri = _RING_INNER_R * r
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _POLYGONS[shape]], fill=255)
    return np.asarray(img) > 127


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1)x(2k+1) square (separable: a row pass then a column pass)."""
    n = mask.shape[0]
    rows = np.pad(mask, ((k, k), (0, 0)))
    out = np.logical_and.reduce([rows[d : d + n] for d in range(2 * k + 1)])
    cols = np.pad(out, ((0, 0), (k, k)))
    return np.logical_and.reduce([cols[:, d : d + n] for d in range(2 * k + 1)])


def _pattern_mask(
    pattern: str, xx: np.ndarray, yy: np.ndarray, period: float, angle: float, phase: tuple[float, float]
) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u = (c * xx + s * yy) / period + phase[0]
    v = (-s * xx + c * yy) / period + phase[1]
    if pattern == "striped":
        return ((u + v) / math.sqrt(2)) % 1.0 < 0.5
    if pattern == "dotted":
        du, dv = u % 1.0 - 0.5, v % 1.0 - 0.5
        return du * du + dv * dv < 0.28**2
    if pattern == "checkered":
        cell = 0.6
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    return np.zeros(xx.shape, dtype=bool)


def _jitter_rgb(rgb: RGB, gen: Optional[np.random.Generator], amount: float) -> np.ndarray:
    base = np.asarray(rgb, dtype=np.float32)
    if gen is None:
        return base
    return np.clip(base + gen.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _ink(color: str, fill: np.ndarray) -> np.ndarray:
    if color in _DARKEN_INK:
        return fill * 0.5
    return fill + (255.0 - fill) * 0.55


def _background(name: str, side: int, gen: Optional[np.random.Generator]) -> np.ndarray:
    base = _jitter_rgb(_BACKGROUND_RGB[name], gen, 8.0)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img)
    g = gen if gen is not None else np.random.default_rng(0)  # textures always need randomness
    unit = side / 64.0
    if name == "grass":
        for _ in range(260):
            x, y = g.uniform(0, side), g.uniform(0, side)
            length, tilt = g.uniform(2.0, 5.0) * unit, g.uniform(-0.35, 0.35)
            shade = g.uniform(-45, 45)
            col = tuple(int(np.clip(v + shade * (1.2 if i == 1 else 0.8), 0, 255)) for i, v in enumerate(base))
            draw.line((x, y, x + tilt * length, y - length), fill=col, width=max(1, int(0.8 * unit)))
    elif name == "brick":
        mortar = (212, 202, 188)
        draw.rectangle((0, 0, side, side), fill=mortar)
        bh, bw, gap = 8 * unit, 16 * unit, max(1, round(1.0 * unit))
        off0 = g.uniform(0, bw)
        for row in range(int(side / bh) + 1):
            off = off0 + (bw / 2 if row % 2 else 0)
            for col in range(-1, int(side / bw) + 2):
                x0, y0 = col * bw - off, row * bh
                shade = g.uniform(-14, 14)
                fill = tuple(int(np.clip(v + shade, 0, 255)) for v in base)
                draw.rectangle((x0 + gap, y0 + gap, x0 + bw - 1, y0 + bh - 1), fill=fill)
    arr = np.asarray(img, dtype=np.float32)
    if name not in ("grass", "brick"):
        # A faint vertical gradient, so plain backgrounds are not perfectly flat.
        slope = g.uniform(-6, 6) if gen is not None else 0.0
        arr = arr + np.linspace(-slope, slope, side, dtype=np.float32)[:, None, None]
    return arr


def _x_center(position: str, radius: float, size: int) -> float:
    margin = 3.0 * size / 64
    return {"left": margin + radius, "center": size / 2, "right": size - margin - radius}[position]


def render(scene: Scene, size: int = 64, rng: SeedLike = None) -> Image.Image:
    """Draw ``scene`` as an RGB image, deterministic in ``rng``.

    ``rng`` (a seed or generator) adds small jitter to position, scale, rotation, colours and
    textures; ``None`` gives the canonical, jitter-free layout. Edges are anti-aliased by
    drawing at 4x and downsampling with Lanczos.

    Example:
        >>> img = render(Scene("heart", "purple", "checkered", "large", "right", "beige"), rng=7)
        >>> img.mode, img.size
        ('RGB', (64, 64))
    """
    gen = None if rng is None else _rng(rng)
    side = size * _SS
    unit = side / 64.0  # canvas pixels per output pixel at the reference size 64

    def jit(lo: float, hi: float) -> float:
        return 0.0 if gen is None else float(gen.uniform(lo, hi))

    radius = (_SMALL_RADIUS if scene.size == "small" else _LARGE_RADIUS) * (1.0 + jit(-0.06, 0.06))
    cx = (_x_center(scene.position, radius, 64) + jit(-1.5, 1.5)) * unit
    cy = (32.0 + (jit(-3.0, 3.0) if scene.size == "small" else jit(-1.5, 1.5))) * unit
    r = radius * unit
    angle = math.radians(jit(-8.0, 8.0))

    canvas = _background(scene.background, side, gen)
    fill = _jitter_rgb(_COLOR_RGB[scene.color], gen, 10.0)
    mask = _shape_mask(scene.shape, cx, cy, r, angle, side)
    canvas[mask] = fill
    if scene.pattern != "solid":
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        period = float(np.clip(0.5 * radius, 5.0, 9.0)) * unit
        phase = (jit(0.0, 1.0), jit(0.0, 1.0))
        marks = _pattern_mask(scene.pattern, xx - cx, yy - cy, period, angle, phase)
        # Keep a rim in the fill colour so the silhouette stays readable on any background.
        canvas[marks & _erode(mask, max(1, round(1.25 * unit)))] = _ink(scene.color, fill)
    if scene.inner_shape is not None and scene.inner_color is not None:
        dx, dy = _INNER_OFFSET.get(scene.shape, (0.0, 0.0))
        c, s = math.cos(angle), math.sin(angle)
        icx, icy = cx + r * (c * dx - s * dy), cy + r * (s * dx + c * dy)
        inner = _shape_mask(scene.inner_shape, icx, icy, _INNER_SCALE * r, angle, side)
        canvas[inner] = _jitter_rgb(_COLOR_RGB[scene.inner_color], gen, 10.0)
    img = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1] (the diffusers convention)."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


class SceneDataset(torch.utils.data.Dataset):
    """Scenes rendered on the fly; item ``i`` is deterministic in ``(seed, i)``.

    Item ``i`` shows ``sample_scenes(n, seed, ...)[i]`` and returns ``pixel_values``
    (float [3, size, size] in [-1, 1]), a ``caption`` drawn from ``templates`` (with a random
    colour/pattern word order) and ``labels`` (a dict of ints, see :meth:`Scene.labels`).

    Example:
        >>> ds = SceneDataset(10, seed=0)
        >>> item = ds[3]
        >>> item["pixel_values"].shape, ds.scene(3) == sample_scenes(10, seed=0)[3]
        (torch.Size([3, 64, 64]), True)
    """

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        size: int = 64,
        exclude: Collection[tuple[str, str, str]] = HELD_OUT,
        composite_prob: float = 0.2,
        templates: Sequence[int] = FULL_TEMPLATES,
    ) -> None:
        self.n, self.seed, self.size = n, seed, size
        self.exclude, self.composite_prob = exclude, composite_prob
        self.templates = tuple(templates)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        """The scene shown by item ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(index)
        return sample_scene((self.seed, index), exclude=self.exclude, composite_prob=self.composite_prob)

    def __getitem__(self, index: int) -> dict[str, object]:
        scene = self.scene(index)
        gen = np.random.default_rng((self.seed, index, 1))
        image = render(scene, self.size, gen)
        template = self.templates[int(gen.integers(len(self.templates)))]
        return {
            "pixel_values": to_tensor(image),
            "caption": scene.caption(template, order=int(gen.integers(2))),
            "labels": scene.labels(),
        }
