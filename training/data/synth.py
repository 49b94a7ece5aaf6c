"""A procedural multi-domain image world: 32 object classes x 10 colours x 3 sizes x 4 domains.

It stands in for Office-Home offline. Every class is a small list of primitives (filled polygons,
holes, strokes) in a unit box; an instance applies a random affine transform (position, size,
rotation, aspect) and jitter. A domain decides how the resulting mask is painted:

* `photo`     textured gradient background, shaded fill with lighting, soft drop shadow;
* `clipart`   flat pastel background, flat fill, thick black outline;
* `sketch`    paper background, jittered double outline only (no fill);
* `painting`  blurry colour-patch canvas, brush-stroke fill, soft edges, overall blur.

Every image draws from its own RNG keyed by (seed, domain, class, index), so the world is the
same whatever order or process renders it, and the same seed writes byte-identical files.

Layout written by `generate_world` (the contract in DESIGN.md):
    OUT/world.json                      domains, classes, colours, sizes, seed, counts, version
    OUT/<domain>/<class>/<class>_NNNN.png
    OUT/splits/<domain>.json            CoOp split_zhou: {"train"|"val"|"test": [[rel, label, name]]}
    OUT/captions.jsonl                  {"path", "caption", "domain", "class", "colour", "size", "split"}

OUT is a new or empty folder, or one holding a world written here, which `overwrite` replaces as a
whole (never a mix of two worlds): see `generate_world`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .records import DatasetSplits, Sample

GENERATOR_VERSION = "1"
WORLD_NAME = "clipheads-synthetic-world"  # world.json's "name": how a folder is recognised as a world
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
# generate_world renders into OUT/<prefix>XXXX and moves the parts into place at the end; a run killed
# half-way leaves only such a folder, which the next run removes.
STAGING_PREFIX = ".clipheads-synth-partial-"
DOMAINS: tuple[str, ...] = ("photo", "clipart", "sketch", "painting")
# How a caption names each domain ("a sketch of a small red star").
DOMAIN_WORDS: dict[str, str] = {"photo": "photo", "clipart": "clipart", "sketch": "sketch", "painting": "painting"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 20),
    "yellow": (240, 215, 30),
    "green": (50, 160, 60),
    "teal": (20, 150, 150),
    "blue": (40, 80, 215),
    "purple": (130, 50, 180),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "gray": (125, 125, 125),
}
# Object radius as a fraction of half the image side.
SIZES: dict[str, float] = {"small": 0.38, "medium": 0.56, "large": 0.76}
TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing


@dataclass(frozen=True)
class WorldSize:
    """Images per (domain, class) in each split."""

    train: int
    val: int
    test: int

    @property
    def per_class(self) -> int:
        return self.train + self.val + self.test

    def __post_init__(self) -> None:
        counts = (self.train, self.val, self.test)
        if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) < 1:
            raise ValueError(f"images per (domain, class) must be integers >= 0 with at least one image; "
                             f"got train={self.train!r}, val={self.val!r}, test={self.test!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class WorldExistsError(FileExistsError):
    """OUT cannot take the world without mixing it with what is there (the CLI exits 2 on it)."""


WORLD_SIZES: dict[str, WorldSize] = {
    "small": WorldSize(train=16, val=2, test=6),   # 32 x 4 x 24 = 3,072 images, seconds
    "full": WorldSize(train=48, val=12, test=40),  # 32 x 4 x 100 = 12,800 images
}


@dataclass(frozen=True)
class Instance:
    """Everything that decides one image (its RNG seeds the rest: background, jitter, strokes)."""

    domain: str
    classname: str
    colour: str
    size: str
    seed: tuple[int, ...]


# ----------------------------------------------------------------------------- class geometry
# A class is a function returning primitives in a unit box (x, y in [-1, 1], y down):
#   ("fill", points) filled polygon   ("hole", points) erased polygon
#   ("line", points, width) stroke     ("cut", points, width) erased stroke
Prim = tuple
Points = list[tuple[float, float]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28, a0: float = 0.0, a1: float = 2 * math.pi) -> Points:
    return [(cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n + (a1 - a0 < 2 * math.pi))]


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> Points:
    return [(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Points:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star(points: int, inner: float) -> Points:
    return [(r * math.cos(-math.pi / 2 + math.pi * i / points), r * math.sin(-math.pi / 2 + math.pi * i / points))
            for i, r in ((i, 1.0 if i % 2 == 0 else inner) for i in range(2 * points))]


def _heart() -> Points:
    pts = []
    for i in range(40):
        t = 2 * math.pi * i / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17 + 0.1))
    return pts


def _spiral(turns: float = 2.6) -> Points:
    n = 80
    return [(0.95 * (i / n) * math.cos(2 * math.pi * turns * i / n), 0.95 * (i / n) * math.sin(2 * math.pi * turns * i / n)) for i in range(1, n + 1)]


def _shapes() -> dict[str, Callable[[], list[Prim]]]:
    """The 32 classes, in canonical label order."""
    return {
        "circle": lambda: [("fill", _ellipse(0, 0, 1, 1))],
        "triangle": lambda: [("fill", [(0, -1), (0.95, 0.75), (-0.95, 0.75)])],
        "square": lambda: [("fill", _rect(-0.78, -0.78, 0.78, 0.78))],
        "star": lambda: [("fill", _star(5, 0.42))],
        "heart": lambda: [("fill", _heart())],
        "arrow": lambda: [("fill", [(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)])],
        "cross": lambda: [("fill", [(-0.28, -1), (0.28, -1), (0.28, -0.28), (1, -0.28), (1, 0.28), (0.28, 0.28), (0.28, 1),
                                    (-0.28, 1), (-0.28, 0.28), (-1, 0.28), (-1, -0.28), (-0.28, -0.28)])],
        "crescent": lambda: [("fill", _ellipse(0, 0, 1, 1)), ("hole", _ellipse(0.45, -0.15, 0.82, 0.82))],
        "hexagon": lambda: [("fill", _regular(6, 1.0, 0.0))],
        "spiral": lambda: [("line", _spiral(), 0.16)],
        "key": lambda: [("fill", _ellipse(-0.6, 0, 0.4, 0.4)), ("hole", _ellipse(-0.6, 0, 0.17, 0.17)),
                        ("fill", _rect(-0.25, -0.11, 1.0, 0.11)), ("fill", _rect(0.55, 0.05, 0.7, 0.42)),
                        ("fill", _rect(0.82, 0.05, 0.97, 0.33))],
        "house": lambda: [("fill", _rect(-0.7, -0.1, 0.7, 0.95)), ("fill", [(-0.95, -0.05), (0, -0.95), (0.95, -0.05)]),
                          ("hole", _rect(-0.17, 0.4, 0.17, 0.95)), ("hole", _rect(0.3, 0.1, 0.55, 0.35))],
        "tree": lambda: [("fill", _rect(-0.14, 0.2, 0.14, 1.0)), ("fill", _ellipse(0, -0.25, 0.75, 0.7))],
        "umbrella": lambda: [("fill", _ellipse(0, -0.1, 1.0, 0.85, 20, math.pi, 2 * math.pi) + [(1.0, -0.1)]),
                             ("line", [(0, -0.1), (0, 0.75)] + _ellipse(0.22, 0.75, 0.22, 0.22, 8, math.pi, 0), 0.12)],
        "diamond": lambda: [("fill", [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)])],
        "ring": lambda: [("fill", _ellipse(0, 0, 1, 1)), ("hole", _ellipse(0, 0, 0.6, 0.6))],
        "lightning": lambda: [("fill", [(0.15, -1), (-0.55, 0.1), (-0.05, 0.1), (-0.3, 1), (0.6, -0.25), (0.08, -0.25), (0.45, -1)])],
        "cloud": lambda: [("fill", _ellipse(-0.5, 0.15, 0.45, 0.38)), ("fill", _ellipse(0.05, -0.15, 0.52, 0.5)),
                          ("fill", _ellipse(0.55, 0.15, 0.42, 0.36)), ("fill", _rect(-0.5, 0.1, 0.55, 0.5))],
        "flower": lambda: [("fill", _rot(_ellipse(0, -0.55, 0.28, 0.45), k * 2 * math.pi / 6)) for k in range(6)]
        + [("fill", _ellipse(0, 0, 0.3, 0.3)), ("hole", _ellipse(0, 0, 0.15, 0.15))],
        "fish": lambda: [("fill", _ellipse(-0.15, 0, 0.7, 0.42)), ("fill", [(0.45, 0), (1.0, -0.5), (1.0, 0.5)]),
                         ("hole", _ellipse(-0.5, -0.1, 0.08, 0.08))],
        "bell": lambda: [("fill", [(-0.8, 0.6), (-0.6, 0.4), (-0.5, -0.3)] + _ellipse(0, -0.35, 0.5, 0.55, 14, math.pi, 2 * math.pi)
                          + [(0.5, -0.3), (0.6, 0.4), (0.8, 0.6)]), ("fill", _ellipse(0, 0.75, 0.18, 0.18))],
        "cup": lambda: [("fill", [(-0.7, -0.7), (0.45, -0.7), (0.3, 0.8), (-0.55, 0.8)]),
                        ("line", _ellipse(0.5, 0.0, 0.38, 0.35, 14, -math.pi / 2, math.pi / 2), 0.15)],
        "mushroom": lambda: [("fill", _ellipse(0, 0.0, 1.0, 0.75, 20, math.pi, 2 * math.pi) + [(1.0, 0.0)]),
                             ("fill", _rect(-0.25, -0.05, 0.25, 0.9))],
        "sun": lambda: [("fill", _ellipse(0, 0, 0.5, 0.5))]
        + [("line", [(0.65 * math.cos(a), 0.65 * math.sin(a)), (1.0 * math.cos(a), 1.0 * math.sin(a))], 0.13)
           for a in (k * math.pi / 4 for k in range(8))],
        "leaf": lambda: [("fill", _ellipse(0, -0.55, 0.95, 0.95, 14, math.pi * 0.2, math.pi * 0.8)
                          + _ellipse(0, 0.55, 0.95, 0.95, 14, math.pi * 1.2, math.pi * 1.8)),
                         ("cut", [(-0.75, 0), (0.7, 0)], 0.06), ("line", [(0.7, 0), (1.0, 0.15)], 0.1)],
        "bottle": lambda: [("fill", _rect(-0.4, -0.2, 0.4, 1.0)), ("fill", [(-0.4, -0.2), (-0.15, -0.55), (0.15, -0.55), (0.4, -0.2)]),
                           ("fill", _rect(-0.15, -1.0, 0.15, -0.5))],
        "anchor": lambda: [("line", [(0, -0.55), (0, 0.9)], 0.14), ("line", [(-0.45, -0.3), (0.45, -0.3)], 0.13),
                           ("line", _ellipse(0, -0.78, 0.2, 0.2, 12), 0.12),
                           ("line", _ellipse(0, 0.2, 0.8, 0.7, 16, 0.15 * math.pi, 0.85 * math.pi), 0.14)],
        "raindrop": lambda: [("fill", [(0, -1)] + _ellipse(0, 0.35, 0.62, 0.62, 20, -0.15 * math.pi, 1.15 * math.pi))],
        "envelope": lambda: [("fill", _rect(-1, -0.62, 1, 0.62)), ("cut", [(-1, -0.62), (0, 0.1), (1, -0.62)], 0.08)],
        "hourglass": lambda: [("fill", [(-0.6, -0.85), (0.6, -0.85), (0.06, 0), (0.6, 0.85), (-0.6, 0.85), (-0.06, 0)]),
                              ("fill", _rect(-0.8, -1, 0.8, -0.82)), ("fill", _rect(-0.8, 0.82, 0.8, 1))],
        "ladder": lambda: [("line", [(-0.5, -1), (-0.5, 1)], 0.13), ("line", [(0.5, -1), (0.5, 1)], 0.13)]
        + [("line", [(-0.5, y), (0.5, y)], 0.1) for y in (-0.7, -0.25, 0.2, 0.65)],
        "flag": lambda: [("line", [(-0.75, -1), (-0.75, 1)], 0.12),
                         ("fill", [(-0.75, -0.95)] + [(-0.75 + 1.6 * t / 10, -0.95 + 0.12 * math.sin(t / 10 * 2 * math.pi)) for t in range(1, 11)]
                          + [(-0.75 + 1.6 * t / 10, -0.1 + 0.12 * math.sin(t / 10 * 2 * math.pi)) for t in range(10, 0, -1)] + [(-0.75, -0.1)])],
    }


def _rot(points: Points, angle: float) -> Points:
    c, s = math.cos(angle), math.sin(angle)
    return [(c * x - s * y, s * x + c * y) for x, y in points]


SHAPES = _shapes()
CLASSES: tuple[str, ...] = tuple(SHAPES)
# Classes whose meaning survives any rotation get free rotation; the rest stay roughly upright.
_FREE_ROTATION = frozenset({"circle", "square", "star", "arrow", "cross", "crescent", "hexagon", "spiral", "key",
                            "diamond", "ring", "sun", "leaf", "fish", "envelope"})


# ----------------------------------------------------------------------------- rendering

def _rng(seed: Sequence[int]) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed))))


def _draw_mask(prims: list[Prim], w: int, cx: float, cy: float, radius: float, angle: float, aspect: float,
               jitter: float, rng: np.random.Generator) -> Image.Image:
    """Rasterise primitives into an L mask (255 = object) under one affine map plus vertex jitter."""
    mask = Image.new("L", (w, w), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(angle), math.sin(angle)
    sx, sy = radius * aspect, radius / aspect

    def place(points: Points) -> list[tuple[float, float]]:
        out = []
        for x, y in points:
            x, y = x * sx, y * sy
            jx, jy = rng.normal(0.0, jitter, 2) if jitter else (0.0, 0.0)
            out.append((cx + c * x - s * y + jx, cy + s * x + c * y + jy))
        return out

    for prim in prims:
        kind, pts = prim[0], place(prim[1])
        if kind in ("fill", "hole"):
            draw.polygon(pts, fill=255 if kind == "fill" else 0)
        else:
            width = max(1, int(round(prim[2] * radius)))
            value = 255 if kind == "line" else 0
            draw.line(pts, fill=value, width=width, joint="curve")
            for x, y in (pts[0], pts[-1]):  # round caps
                draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=value)
    return mask


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, spread: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0.0, spread, 3), 0, 255)


def _gradient(w: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """(w, w) linear ramp from lo to hi along a random direction."""
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) / max(w - 1, 1) - 0.5
    t = (xx * math.cos(a) + yy * math.sin(a)) / 0.71 * 0.5 + 0.5
    return lo + (hi - lo) * t


def _noise(w: int, rng: np.random.Generator, scale: int, amp: float) -> np.ndarray:
    """Smooth value noise: a coarse random grid upsampled bilinearly, (w, w) in [-amp, amp]."""
    g = max(2, w // scale)
    coarse = Image.fromarray(((rng.random((g, g)) * 255).astype(np.uint8)), "L").resize((w, w), Image.BILINEAR)
    return (np.asarray(coarse, np.float32) / 127.5 - 1.0) * amp


def _blend(base: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return base * (1 - a) + layer * a


def _alpha(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask, np.float32) / 255.0


def _render_photo(mask: Image.Image, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = mask.size[0]
    c1, c2 = rng.uniform(60, 230, 3), rng.uniform(60, 230, 3)
    t = _gradient(w, rng, 0.0, 1.0)[..., None]
    bg = c1 * (1 - t) + c2 * t + _noise(w, rng, 6, 18)[..., None] + rng.normal(0, 5, (w, w, 1))
    # Soft drop shadow: the mask shifted down-right, blurred, darkens the background.
    off = int(w * rng.uniform(0.02, 0.05))
    shadow = _alpha(mask.transform(mask.size, Image.AFFINE, (1, 0, -off, 0, 1, -off)).filter(ImageFilter.GaussianBlur(w / 40)))
    bg = bg * (1 - 0.45 * shadow[..., None])
    light = _gradient(w, rng, 1.3, 0.65)[..., None]  # directional lighting across the object
    obj = rgb * light + _noise(w, rng, 10, 14)[..., None] + rng.normal(0, 4, (w, w, 1))
    return _blend(bg, obj, _alpha(mask.filter(ImageFilter.GaussianBlur(0.6))))


def _render_clipart(mask: Image.Image, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = mask.size[0]
    bg = np.broadcast_to(rng.uniform(205, 255, 3), (w, w, 3)).astype(np.float32)
    k = max(3, int(w * rng.uniform(0.035, 0.06)) | 1)
    outline = _alpha(mask.filter(ImageFilter.MaxFilter(k)))
    img = _blend(bg, np.zeros(3, np.float32) + rng.uniform(0, 30), outline)
    return _blend(img, rgb, _alpha(mask))


def _render_sketch(masks: list[Image.Image], rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = masks[0].size[0]
    paper = rng.uniform(225, 252) + _noise(w, rng, 4, 6) + rng.normal(0, 3, (w, w))
    img = np.repeat(paper[..., None], 3, axis=2)
    ink = rgb * rng.uniform(0.45, 0.75)  # pencil in a darker shade of the object's colour
    for i, m in enumerate(masks):  # each pass is a separately jittered outline
        edge = np.asarray(m.filter(ImageFilter.MaxFilter(3)), np.float32) - np.asarray(m.filter(ImageFilter.MinFilter(3)), np.float32)
        strength = (0.9 if i == 0 else 0.5) * np.clip(edge / 255.0, 0, 1)
        img = _blend(img, ink, strength * (0.75 + 0.25 * rng.random((w, w))))
    return img


def _render_painting(mask: Image.Image, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = mask.size[0]
    canvas = Image.new("RGB", (w, w), tuple(int(v) for v in rng.uniform(80, 220, 3)))
    d = ImageDraw.Draw(canvas)
    for _ in range(8):  # blurry colour patches
        x, y, r = rng.uniform(0, w), rng.uniform(0, w), rng.uniform(w * 0.1, w * 0.4)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.uniform(60, 230, 3)))
    bg = np.asarray(canvas.filter(ImageFilter.GaussianBlur(w / 10)), np.float32)
    strokes = Image.new("RGB", (w, w), tuple(int(v) for v in rgb))
    d = ImageDraw.Draw(strokes)
    for _ in range(40):  # brush strokes in shades of the object's colour
        x, y, a, ln = rng.uniform(0, w), rng.uniform(0, w), rng.uniform(0, math.pi), rng.uniform(w * 0.05, w * 0.2)
        col = tuple(int(v) for v in np.clip(rgb + rng.normal(0, 28, 3), 0, 255))
        d.line((x, y, x + ln * math.cos(a), y + ln * math.sin(a)), fill=col, width=max(2, int(w * 0.05)))
    soft = mask.filter(ImageFilter.GaussianBlur(w / 60))
    img = _blend(bg, np.asarray(strokes, np.float32), _alpha(soft))
    return img


def sample_instance(domain: str, classname: str, seed: Sequence[int]) -> Instance:
    """Pick colour and size from the instance's own RNG (so they are part of the deterministic world)."""
    rng = _rng(tuple(seed) + (1,))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    return Instance(domain, classname, colour, size, tuple(seed))


def render(inst: Instance, image_size: int = 64) -> Image.Image:
    """Draw one instance as an RGB image of `image_size` pixels."""
    rng = _rng(inst.seed + (2,))
    w = image_size * SUPERSAMPLE
    half = w / 2
    radius = half * SIZES[inst.size] * rng.uniform(0.9, 1.08)
    margin = half - radius
    cx, cy = half + rng.uniform(-margin, margin) * 0.9, half + rng.uniform(-margin, margin) * 0.9
    free = inst.classname in _FREE_ROTATION
    angle = rng.uniform(-math.pi, math.pi) if free else rng.normal(0, 0.25)
    aspect = math.exp(rng.normal(0, 0.1))
    prims = SHAPES[inst.classname]()
    rgb = _jitter_colour(COLOURS[inst.colour], rng, 12)
    if inst.domain == "sketch":
        jit = radius * 0.02
        masks = [_draw_mask(prims, w, cx, cy, radius, angle, aspect, jit, rng)]
        masks.append(_draw_mask(prims, w, cx + rng.normal(0, 1.5), cy + rng.normal(0, 1.5), radius * rng.uniform(0.97, 1.03),
                                angle + rng.normal(0, 0.04), aspect, jit, rng))
        arr = _render_sketch(masks, rgb, rng)
    else:
        mask = _draw_mask(prims, w, cx, cy, radius, angle, aspect, radius * 0.006, rng)
        arr = {"photo": _render_photo, "clipart": _render_clipart, "painting": _render_painting}[inst.domain](mask, rgb, rng)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if inst.domain == "painting":
        img = img.filter(ImageFilter.GaussianBlur(SUPERSAMPLE * 0.6))
    return img.resize((image_size, image_size), Image.BOX)


def caption(inst: Instance, *, domain: bool = True, colour: bool = True, size: bool = True) -> str:
    """A caption naming the class and any of the instance's nuisance attributes."""
    words = [w for w, keep in ((inst.size, size), (inst.colour, colour)) if keep] + [inst.classname.replace("_", " ")]
    head = f"a {DOMAIN_WORDS[inst.domain]} of" if domain else "a photo of"
    obj = " ".join(words)
    return f"{head} {'an' if obj[0] in 'aeiou' else 'a'} {obj}."


# ----------------------------------------------------------------------------- the world on disk

def _instance_seed(seed: int, domain: str, label: int, index: int) -> tuple[int, ...]:
    return (seed, DOMAINS.index(domain), label, index)


def _split_of(index: int, ws: WorldSize) -> str:
    return "train" if index < ws.train else "val" if index < ws.train + ws.val else "test"


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)  # fixed options, no metadata chunks
    return buf.getvalue()


def _render_job(job: tuple[str, int, int, int, int]) -> tuple[str, int, int, bytes, dict]:
    domain, label, index, seed, image_size = job
    inst = sample_instance(domain, CLASSES[label], _instance_seed(seed, domain, label, index))
    return domain, label, index, _png_bytes(render(inst, image_size)), {"colour": inst.colour, "size": inst.size, "caption": caption(inst)}


def _jobs(seed: int, ws: WorldSize, image_size: int, domains: Sequence[str] = DOMAINS) -> Iterator[tuple[str, int, int, int, int]]:
    for domain in domains:
        for label in range(len(CLASSES)):
            for index in range(ws.per_class):
                yield domain, label, index, seed, image_size


def generate_world(out_dir: str | os.PathLike, seed: int = 0, size: str | WorldSize = "small", image_size: int = 64,
                   workers: int | None = None, progress: bool = False, domains: Sequence[str] | None = None,
                   overwrite: bool = True) -> Path:
    """Write the world (layout in the module docstring) and return its root.

    `size` is a preset name or explicit per-(domain, class) counts (tests use a few images each).
    `domains` writes only those domains (default all): each image is seeded by its own (domain,
    class, index), so a domain's bytes are the same as in the full world.

    `out_dir` must be missing, empty, or hold a world written here (its world.json names
    WORLD_NAME). Such a world is replaced as a whole when `overwrite` (the default; the CLI's
    default is to refuse): its world.json, splits/, captions.jsonl and domain folders are deleted,
    and nothing else is. A non-empty folder holding no world, or an entry that is not part of the
    old world in the way of the new one, raises WorldExistsError before anything is rendered. The
    new world is rendered into a staging folder inside `out_dir` and moved into place only once
    complete, so a failed run leaves the old world (or nothing) behind.
    """
    ws = _world_size(size)
    domains = tuple(DOMAINS if domains is None else domains)
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or not domains:
        raise ValueError(f"domains must be some of {', '.join(DOMAINS)}; got {list(domains)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if not _is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}; got {image_size!r}")
    seed, image_size = int(seed), int(image_size)
    out = Path(out_dir).expanduser().resolve()
    check_out_dir(out, domains, overwrite)  # before any work
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    done = False
    try:
        _write_world(stage, seed, ws, size, image_size, workers, progress, domains)
        old, stale = check_out_dir(out, domains, overwrite, ignore=stage.name)  # again: OUT may have changed meanwhile
        for path in stale + [p for p in old if p.name != "world.json"]:
            _remove(path)
        for part in sorted(stage.iterdir()):  # the new parts, world.json last (atomically over the old one)
            if part.name != "world.json":
                os.replace(part, out / part.name)
        os.replace(stage / "world.json", out / "world.json")
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and not existed:
            try:
                out.rmdir()  # only if still empty
            except OSError:
                pass
    return out


def read_world(root: str | os.PathLike) -> dict | None:
    """root/world.json when it describes a world written here, else None."""
    try:
        desc = json.loads((Path(root) / "world.json").read_text())
    except (OSError, ValueError):
        return None
    return desc if isinstance(desc, dict) and desc.get("name") == WORLD_NAME else None


def world_parts(desc: dict) -> set[str]:
    """The names directly under a world's root that make up the world `desc` describes."""
    names = {"world.json", "splits", "captions.jsonl"}
    for d in desc.get("domains") or ():
        name = d if isinstance(d, str) else d.get("name") if isinstance(d, dict) else None
        if name in DOMAINS:  # never a name read from the file that could point elsewhere
            names.add(name)
    return names


def check_out_dir(out: Path, domains: Sequence[str] = DOMAINS, overwrite: bool = True,
                  ignore: str | None = None) -> tuple[list[Path], list[Path]]:
    """Whether a world may be written to `out`: (the old world's parts to delete, stale staging
    folders to delete), or WorldExistsError saying why not (rules in `generate_world`)."""
    if out.exists() and not out.is_dir():
        raise WorldExistsError(f"{out} exists and is not a directory")
    if not out.exists():
        return [], []
    stale, rest = [], []
    for p in sorted(out.iterdir()):
        if p.name == ignore:
            continue
        (stale if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink() else rest).append(p)
    if not rest:
        return [], stale
    old = read_world(out)
    if old is None:
        why = ("its world.json was not written by `clipheads data synth`" if (out / "world.json").exists()
               else "holds no synthetic world")
        raise WorldExistsError(f"{out} is not empty and {why} ({_listing(rest)}); write the world to a new or "
                               "empty folder")
    if not overwrite:
        raise WorldExistsError(f"{out} already holds a synthetic world (seed {old.get('seed')}, size {old.get('size')}, "
                               f"{old.get('total_images')} images); pass --overwrite to replace it, or write to a new "
                               "or empty folder")
    parts = world_parts(old)
    new = {"world.json", "splits", "captions.jsonl", *domains}
    in_the_way = [p for p in rest if p.name in new and p.name not in parts]
    if in_the_way:
        raise WorldExistsError(f"{out} holds {', '.join(p.name for p in in_the_way)}, which is not part of its "
                               "synthetic world and would be mixed into the new one; move it away first")
    return [p for p in rest if p.name in parts], stale


def _listing(paths: Sequence[Path], shown: int = 3) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:shown]]
    more = f", ... ({len(paths)} entries)" if len(paths) > shown else ""
    return "found " + ", ".join(names) + more


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)  # a link is removed, never what it points to
    else:
        shutil.rmtree(path)


def _write_world(out: Path, seed: int, ws: WorldSize, size: str | WorldSize, image_size: int, workers: int | None,
                 progress: bool, domains: Sequence[str]) -> None:
    jobs = list(_jobs(seed, ws, image_size, domains))
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    splits = {d: {"train": [], "val": [], "test": []} for d in domains}
    captions: list[dict] = []
    results = _run_jobs(jobs, workers, progress)
    for domain, label, index, png, attrs in results:  # ordered like `jobs`
        name = CLASSES[label]
        rel = f"{name}/{name}_{index:04d}.png"
        path = out / domain / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        split = _split_of(index, ws)
        splits[domain][split].append([rel, label, name])
        captions.append({"path": f"{domain}/{rel}", "caption": attrs["caption"], "domain": domain, "class": name,
                         "colour": attrs["colour"], "size": attrs["size"], "split": split})
    (out / "splits").mkdir(exist_ok=True)
    for domain in domains:
        (out / "splits" / f"{domain}.json").write_text(json.dumps(splits[domain], indent=4) + "\n")
    (out / "captions.jsonl").write_text("".join(json.dumps(c, sort_keys=True) + "\n" for c in captions))
    (out / "world.json").write_text(json.dumps(world_description(seed, size, image_size, domains), indent=2) + "\n")


def _run_jobs(jobs: list, workers: int, progress: bool) -> list:
    bar = _progress(len(jobs), progress)
    out = []
    if workers <= 1:
        for job in jobs:
            out.append(_render_job(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for res in pool.map(_render_job, jobs, chunksize=64):
                out.append(res)
                bar.update()
    bar.close()
    return out


def _progress(total: int, enabled: bool):
    from ..console import progress

    return progress(total=total, unit="img", desc="synth", enabled=enabled)


def _world_size(size: str | WorldSize) -> WorldSize:
    if isinstance(size, WorldSize):
        return size
    if size not in WORLD_SIZES:
        raise ValueError(f"size must be one of {', '.join(WORLD_SIZES)}; got {size!r}")
    return WORLD_SIZES[size]


def world_description(seed: int, size: str | WorldSize, image_size: int, domains: Sequence[str] = DOMAINS) -> dict:
    ws = _world_size(size)
    domains = list(domains)
    n = len(CLASSES)
    return {
        "name": WORLD_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size if isinstance(size, str) else "custom",
        "image_size": image_size,
        "domains": domains,
        "classes": list(CLASSES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "templates": list(TEMPLATES),
        "per_class_per_domain": {"train": ws.train, "val": ws.val, "test": ws.test},
        "counts": {d: {"train": ws.train * n, "val": ws.val * n, "test": ws.test * n} for d in domains},
        "total_images": ws.per_class * n * len(domains),
    }


def load_world_splits(root: str | os.PathLike, domain: str) -> DatasetSplits:
    """One domain of a world written by `generate_world`, as absolute-path Samples."""
    root = Path(root).expanduser().resolve()
    world = json.loads((root / "world.json").read_text())
    if domain not in world["domains"]:
        raise ValueError(f"unknown domain {domain!r}; this world has {', '.join(world['domains'])}")
    classnames = tuple(world["classes"])
    raw = json.loads((root / "splits" / f"{domain}.json").read_text())

    def samples(split: str) -> tuple[Sample, ...]:
        return tuple(Sample(str(root / domain / rel), int(label), name, domain) for rel, label, name in raw[split])

    meta = {"reader": "synthetic", "world": str(root), "world_seed": world["seed"], "domain": domain}
    return DatasetSplits(f"synthetic-{domain}", classnames, samples("train"), samples("val"), samples("test"),
                         tuple(world.get("templates", TEMPLATES)), meta)


def int_range(low: int, high: int | None = None):
    """An argparse type: an integer in low..high (bad values are bad usage: exit 2, one line)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in {low}..{high}' if high is not None else f'>= {low}'}, "
                                             f"got {value}")
        return value

    parse.__name__ = "integer"
    return parse


_SYNTH_EPILOG = """\
OUT must be a new or empty folder. If it already holds a world written by this command, the run
refuses unless --overwrite is given; --overwrite replaces that world as a whole: it deletes the old
world's world.json, splits/, captions.jsonl and domain folders (photo/, clipart/, ...) and nothing
else, so no image of the old world survives beside the new one. A non-empty folder that holds no
world is refused even with --overwrite. The world is rendered into a hidden staging folder inside
OUT and moved into place when complete: a failed or interrupted run leaves the old world as it was.
"""


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from .. import console

    p = console.ArgumentParser(prog="clipheads data synth", description="write the synthetic multi-domain world",
                               epilog=_SYNTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory: new, empty, or (with --overwrite) holding a world to replace")
    p.add_argument("--seed", type=int_range(0), default=0, help="world seed, >= 0 (same seed -> identical bytes)")
    p.add_argument("--size", choices=sorted(WORLD_SIZES), default="small", help="images per (domain, class) preset")
    p.add_argument("--image-size", type=int_range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=64,
                   help=f"rendered image side in pixels, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    p.add_argument("--per-class", default=None, metavar="TRAIN,VAL,TEST",
                   help="explicit images per (domain, class) and split, instead of --size (e.g. 1,1,1)")
    p.add_argument("--workers", type=int_range(1), default=None, help="render processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the world OUT already holds (only its world.json, splits/, captions.jsonl and "
                        "domain folders are deleted)")
    console.add_output_flags(p)
    args, code = console.parse(p, argv)
    if args is None:
        return code

    def run() -> int:
        size: str | WorldSize = args.size
        if args.per_class is not None:
            try:
                size = WorldSize(*(int(v) for v in args.per_class.split(",")))
            except (TypeError, ValueError):
                raise console.BadInput(f"--per-class wants three integers TRAIN,VAL,TEST, each >= 0 and at least one "
                                       f"image in all; got {args.per_class!r}") from None
        t0 = time.perf_counter()
        root = generate_world(args.out, seed=args.seed, size=size, image_size=args.image_size, workers=args.workers,
                              progress=not (args.quiet), overwrite=args.overwrite)
        desc = json.loads((root / "world.json").read_text())
        seconds = time.perf_counter() - t0
        console.emit({"out": str(root.resolve()), "images": desc["total_images"], "domains": len(DOMAINS),
                      "classes": len(CLASSES), "image_size": args.image_size, "seed": args.seed,
                      "seconds": round(seconds, 2)}, args.json,
                     f"wrote {desc['total_images']} images ({len(DOMAINS)} domains x {len(CLASSES)} classes, "
                     f"{args.image_size}px, seed {args.seed}) to {root} in {seconds:.1f}s")
        return 0

    return console.run("clipheads data synth", run, (OSError,), as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
