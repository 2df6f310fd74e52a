"""Deterministic synthetic "shapes" captioning data.

128x128 RGB images of one or two flat-coloured shapes on a near-white
background, each with its reference captions. Held-out evaluation images are
drawn by code outside this repo from the same spec, so the constants below are
the spec and should not be tuned.

Library use::

    from clipcap.training.shapes import generate, hard_negatives
    samples = generate(1000, seed=0)

Written to disk by training/shapes.py (`write_dataset`, `write_samples`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
COLOUR_JITTER = 20
# Radius / half-side / half-base ranges in pixels (inclusive).
SIZES = {"small": (8, 14), "large": (24, 34)}
SIZES_KEYS = tuple(SIZES)
COLOUR_KEYS = tuple(COLOURS)
PAIR_SIZE = (12, 20)
BACKGROUND_RANGE = (235, 255)
# Peak-to-peak background noise stays <= 8 (spec), drawn per image so that both
# flat and noisy backgrounds are seen.
MAX_NOISE_AMPLITUDE = 4
MIN_GAP = 4
MIN_DOMINANT_OFFSET = 30
DOMINANCE_RATIO = 2.0
# Keeps shapes off the very border so "fully inside" survives rasterisation.
BORDER_MARGIN = 2
# Generation aims a little inside the gap / dominance limits so that measured
# pixel centroids and gaps (rasterisation moves them by ~1 px) still obey them.
SAFETY_PX = 2

RELATIONS = ("to the left of", "to the right of", "above", "below")
FLIPPED_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; (cx, cy) is the area centroid, r the radius/half-side/half-base."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    r: int
    size: str | None = None  # "small"/"large" for one-object images only

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) extent of the shape."""
        if self.shape == "triangle":
            # Centroid of an upright equilateral triangle sits 1/3 of its height
            # above the base, so the apex is 2/3 of the height above it.
            h = self.r * math.sqrt(3.0)
            return (self.cx - self.r, self.cy - 2.0 * h / 3.0, self.cx + self.r, self.cy + h / 3.0)
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class ShapeSample:
    """A generated image with all its reference captions.

    ``captions[0]`` is the canonical caption; two-object samples have a second
    reference with the objects in the other order. ``objects`` are in canonical
    order (left/upper object first) and ``relation`` is the canonical relation
    ("to the left of" or "above"), ``None`` for one-object images.
    """

    image: Image.Image
    captions: list[str]
    objects: list[ShapeObject]
    relation: str | None

    @property
    def caption(self) -> str:
        return self.captions[0]


def one_object_caption(size: str, colour: str, shape: str) -> str:
    return f"a {size} {colour} {shape}."


def two_object_caption(first: str, relation: str, second: str) -> str:
    """``first``/``second`` are "{colour} {shape}" phrases."""
    return f"a {first} {relation} a {second}."


def all_captions() -> list[str]:
    """Every caption the grammar can produce (one- and two-object, all relations)."""
    phrases = [f"{c} {s}" for c in COLOUR_KEYS for s in SHAPES]
    out = [one_object_caption(z, c, s) for z in SIZES_KEYS for c in COLOUR_KEYS for s in SHAPES]
    out += [two_object_caption(a, rel, b) for a in phrases for b in phrases if a != b for rel in RELATIONS]
    return out


def hard_negatives(sample: ShapeSample) -> list[str]:
    """Captions that differ from the truth only in what plain CLIP tends to ignore.

    Two objects: the canonical caption with the relation flipped, and with the
    objects swapped. These two are also the flip/swap of the other reference, so
    they are exactly the wrong captions naming the same two objects on the same
    axis. One object: the caption with the other size.
    """
    if sample.relation is None:
        obj = sample.objects[0]
        other = "large" if obj.size == "small" else "small"
        return [one_object_caption(other, obj.colour, obj.shape)]
    a, b = sample.objects
    return [
        two_object_caption(a.phrase, FLIPPED_RELATION[sample.relation], b.phrase),
        two_object_caption(b.phrase, sample.relation, a.phrase),
    ]


def _jittered_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour])
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in rgb)


def _inside(obj: ShapeObject) -> bool:
    x0, y0, x1, y1 = obj.bbox()
    hi = IMAGE_SIZE - 1 - BORDER_MARGIN
    return x0 >= BORDER_MARGIN and y0 >= BORDER_MARGIN and x1 <= hi and y1 <= hi


def _place(rng: np.random.Generator, shape: str, colour: str, r: int, size: str | None) -> ShapeObject:
    """Uniform centroid such that the whole shape is inside the canvas."""
    rgb = _jittered_rgb(rng, colour)
    while True:
        cx, cy = rng.uniform(0, IMAGE_SIZE - 1, size=2)
        obj = ShapeObject(shape, colour, rgb, float(cx), float(cy), r, size)
        if _inside(obj):
            return obj


def _bbox_gap(a: ShapeObject, b: ShapeObject) -> float:
    """Separation of the two bounding boxes along the axis where they are apart.

    Boxes contain their shapes, so this is a lower bound on the pixel gap.
    """
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def _two_objects_ok(a: ShapeObject, b: ShapeObject) -> bool:
    dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
    major, minor = max(dx, dy), min(dx, dy)
    return (
        major >= MIN_DOMINANT_OFFSET + SAFETY_PX
        and major >= DOMINANCE_RATIO * (minor + SAFETY_PX)
        and _bbox_gap(a, b) >= MIN_GAP + SAFETY_PX
    )


def _draw(objects: list[ShapeObject], rng: np.random.Generator) -> Image.Image:
    base = rng.integers(BACKGROUND_RANGE[1] - 12, BACKGROUND_RANGE[1] + 1, size=3)
    amp = int(rng.integers(0, MAX_NOISE_AMPLITUDE + 1))
    noise = rng.integers(-amp, amp + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(base + noise, *BACKGROUND_RANGE).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox()
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
        else:
            draw.polygon([(obj.cx, y0), (x0, y1), (x1, y1)], fill=obj.rgb)
    return image


def _one_object(rng: np.random.Generator) -> ShapeSample:
    size = SIZES_KEYS[int(rng.integers(len(SIZES_KEYS)))]
    colour = COLOUR_KEYS[int(rng.integers(len(COLOUR_KEYS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    r = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
    obj = _place(rng, shape, colour, r, size)
    return ShapeSample(_draw([obj], rng), [one_object_caption(size, colour, shape)], [obj], None)


def _two_objects(rng: np.random.Generator) -> ShapeSample:
    pairs = [(c, s) for c in COLOUR_KEYS for s in SHAPES]
    i, j = rng.choice(len(pairs), size=2, replace=False)
    specs = [pairs[int(i)], pairs[int(j)]]
    while True:
        a, b = (_place(rng, s, c, int(rng.integers(PAIR_SIZE[0], PAIR_SIZE[1] + 1)), None) for c, s in specs)
        if _two_objects_ok(a, b):
            break
    if abs(b.cx - a.cx) >= abs(b.cy - a.cy):
        first, second = sorted((a, b), key=lambda o: o.cx)
        relation = "to the left of"
    else:
        first, second = sorted((a, b), key=lambda o: o.cy)
        relation = "above"
    captions = [
        two_object_caption(first.phrase, relation, second.phrase),
        two_object_caption(second.phrase, FLIPPED_RELATION[relation], first.phrase),
    ]
    # Draw in the original (random) order, not canonical order, so nothing about
    # the drawing order correlates with the caption.
    return ShapeSample(_draw([a, b], rng), captions, [first, second], relation)


def generate_one(seed: int, index: int) -> ShapeSample:
    """Sample ``index`` of the stream for ``seed``; even indices have one object, odd two."""
    rng = np.random.default_rng([seed, index])
    return _one_object(rng) if index % 2 == 0 else _two_objects(rng)


def generate(n: int, seed: int) -> list[ShapeSample]:
    """``n`` samples; sample i depends only on (seed, i), never on n."""
    return [generate_one(seed, i) for i in range(n)]


@dataclass
class WriteConfig:
    out: Path  # the directory written (created)
    n: int = 2000  # images
    seed: int = 0  # image i depends only on (seed, i)


def group(sample: ShapeSample) -> str:
    """The evaluation group: exact match is reported separately for one- and two-object images."""
    return "one-object" if sample.relation is None else "two-object"


def write_dataset(cfg: WriteConfig) -> None:
    """PNGs under out/images and three caption files, all readable by clipcap.training.data:

    - captions.jsonl: every reference of an image (+ the canonical one and its group): for evaluation;
    - canonical.jsonl: the canonical caption only (left/upper object first): training targets;
    - pairs.jsonl: one row per reference, both orders: training without the canonical order.
    """
    (cfg.out / "images").mkdir(parents=True, exist_ok=True)
    with (open(cfg.out / "captions.jsonl", "w") as fc, open(cfg.out / "pairs.jsonl", "w") as fp,
          open(cfg.out / "canonical.jsonl", "w") as fk):
        for i in tqdm(range(cfg.n), desc="writing shapes"):
            sample = generate_one(cfg.seed, i)
            rel = f"images/{i:06d}.png"
            sample.image.save(cfg.out / rel)
            fc.write(json.dumps({"image": rel, "captions": sample.captions, "caption": sample.caption,
                                 "group": group(sample)}) + "\n")
            fk.write(json.dumps({"image": rel, "caption": sample.caption, "group": group(sample)}) + "\n")
            for caption in sample.captions:
                fp.write(json.dumps({"image": rel, "caption": caption, "group": group(sample)}) + "\n")


def write_samples(cfg: WriteConfig) -> None:
    """A handful of images for demos: out/shapes-NN.png and out/captions.json ({file: references})."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    references = {}
    for i in range(cfg.n):
        sample = generate_one(cfg.seed, i)
        name = f"shapes-{i:02d}.png"
        sample.image.save(cfg.out / name)
        references[name] = sample.captions
    (cfg.out / "captions.json").write_text(json.dumps(references, indent=2) + "\n")
