"""Checks clipcap.training.shapes (and its script, training/shapes.py) against the data spec by measuring the drawn pixels.

Held-out data is drawn by other code from the same spec, so these tests look at
the images themselves rather than at the generator's own metadata.
"""

import json
import re
from collections import deque

import numpy as np
import pytest

from clipcap.training import shapes
from training import shapes as shapes_script

N = 200
CAPTION_ONE = re.compile(r"^a (small|large) (\w+) (circle|square|triangle)\.$")
CAPTION_TWO = re.compile(
    r"^a (\w+) (circle|square|triangle) (to the left of|to the right of|above|below) a (\w+) (circle|square|triangle)\.$"
)


@pytest.fixture(scope="module")
def samples():
    return shapes.generate(N, seed=123)


def components(pixels: np.ndarray) -> list[np.ndarray]:
    """4-connected components of non-background pixels, as (row, col) arrays, largest first."""
    # Every named colour has a channel <= 80 even after jitter; background is >= 235.
    mask = pixels.min(axis=2) < 160
    seen = np.zeros_like(mask)
    comps = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(members))
    return sorted(comps, key=len, reverse=True)


def measure(pixels: np.ndarray, comp: np.ndarray) -> dict:
    """Colour name, shape, size parameter and centroid of one component."""
    ys, xs = comp[:, 0], comp[:, 1]
    colour = np.median(pixels[ys, xs], axis=0)
    name = min(shapes.COLOURS, key=lambda c: np.abs(colour - shapes.COLOURS[c]).max())
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = len(comp) / (w * h)
    # Fill ratio of the bounding box: square 1, circle pi/4, triangle 1/2.
    shape = "square" if fill > 0.92 else "circle" if fill > 0.66 else "triangle"
    return {
        "colour": name,
        "rgb": colour,
        "shape": shape,
        "r": (w - 1) / 2,  # radius, half-side and half-base all span the width
        "cx": xs.mean(),
        "cy": ys.mean(),
        "touches_border": xs.min() == 0 or ys.min() == 0 or xs.max() == 127 or ys.max() == 127,
    }


def test_image_format_and_background(samples):
    for s in samples:
        px = np.asarray(s.image)
        assert s.image.mode == "RGB" and px.shape == (128, 128, 3)
        objects = np.zeros((128, 128), bool)
        for comp in components(px):
            objects[comp[:, 0], comp[:, 1]] = True
        bg = px[~objects]
        assert bg.min() >= 235 and bg.max() <= 255
        # Mild noise: each channel spans at most 8 levels.
        assert (bg.max(axis=0).astype(int) - bg.min(axis=0)).max() <= 8


def test_one_object_measurements(samples):
    for s in samples:
        if s.relation is not None:
            continue
        px = np.asarray(s.image)
        comps = components(px)
        assert len(comps) == 1
        m = measure(px, comps[0])
        size, colour, shape = CAPTION_ONE.match(s.caption).groups()
        assert (m["colour"], m["shape"]) == (colour, shape), s.caption
        assert np.abs(m["rgb"] - shapes.COLOURS[colour]).max() <= shapes.COLOUR_JITTER
        lo, hi = shapes.SIZES[size]
        assert lo - 1 <= m["r"] <= hi + 1, (s.caption, m["r"])
        assert not m["touches_border"]


def test_two_object_measurements(samples):
    for s in samples:
        if s.relation is None:
            continue
        px = np.asarray(s.image)
        comps = components(px)
        assert len(comps) == 2, s.caption
        ms = [measure(px, c) for c in comps]
        for m in ms:
            assert 12 - 1 <= m["r"] <= 20 + 1
            assert np.abs(m["rgb"] - shapes.COLOURS[m["colour"]]).max() <= shapes.COLOUR_JITTER
            assert not m["touches_border"]
        assert (ms[0]["colour"], ms[0]["shape"]) != (ms[1]["colour"], ms[1]["shape"])

        gap = np.sqrt(((comps[0][:, None, :] - comps[1][None, :, :]) ** 2).sum(-1)).min()
        assert gap >= 4
        dx, dy = abs(ms[0]["cx"] - ms[1]["cx"]), abs(ms[0]["cy"] - ms[1]["cy"])
        assert max(dx, dy) >= 30 and max(dx, dy) >= 2 * min(dx, dy)

        for caption in s.captions:
            c1, s1, rel, c2, s2 = CAPTION_TWO.match(caption).groups()
            by_name = {(m["colour"], m["shape"]): m for m in ms}
            a, b = by_name[(c1, s1)], by_name[(c2, s2)]
            expected = {
                "to the left of": a["cx"] < b["cx"] and dx > dy,
                "to the right of": a["cx"] > b["cx"] and dx > dy,
                "above": a["cy"] < b["cy"] and dy > dx,
                "below": a["cy"] > b["cy"] and dy > dx,
            }[rel]
            assert expected, caption


def test_captions_and_references(samples):
    ones = [s for s in samples if s.relation is None]
    twos = [s for s in samples if s.relation is not None]
    assert len(ones) == len(twos) == N // 2
    all_captions = set(shapes.all_captions())
    for s in ones:
        assert len(s.captions) == 1 and CAPTION_ONE.match(s.caption)
        assert s.caption in all_captions
    for s in twos:
        assert len(s.captions) == 2
        c1, s1, rel, c2, s2 = CAPTION_TWO.match(s.caption).groups()
        assert rel in ("to the left of", "above")  # canonical order
        assert s.captions[1] == f"a {c2} {s2} {shapes.FLIPPED_RELATION[rel]} a {c1} {s1}."
        assert set(s.captions) <= all_captions


def test_canonical_relations_cover_both_axes(samples):
    relations = {s.relation for s in samples if s.relation is not None}
    assert relations == {"to the left of", "above"}


def test_hard_negatives(samples):
    for s in samples:
        negatives = shapes.hard_negatives(s)
        assert not set(negatives) & set(s.captions)
        if s.relation is None:
            size, colour, shape = CAPTION_ONE.match(s.caption).groups()
            other = {"small": "large", "large": "small"}[size]
            assert negatives == [f"a {other} {colour} {shape}."]
        else:
            c1, s1, rel, c2, s2 = CAPTION_TWO.match(s.caption).groups()
            flipped = shapes.FLIPPED_RELATION[rel]
            assert negatives == [f"a {c1} {s1} {flipped} a {c2} {s2}.", f"a {c2} {s2} {rel} a {c1} {s1}."]


def test_deterministic_and_independent_of_n():
    a, b = shapes.generate(6, seed=7), shapes.generate(10, seed=7)
    for x, y in zip(a, b):
        assert x.captions == y.captions
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = shapes.generate(6, seed=8)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(z.image)) for x, z in zip(a, c))


def test_cli_writes_dataset(tmp_path):
    shapes_script.main(["--out", str(tmp_path), "--n", "4", "--seed", "0"])
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [f"images/{i:06d}.png" for i in range(4)]
    assert all((tmp_path / r["image"]).is_file() and r["caption"] == r["captions"][0] for r in rows)
    canonical = [json.loads(line) for line in (tmp_path / "canonical.jsonl").read_text().splitlines()]
    assert pairs == [{"image": r["image"], "caption": c, "group": r["group"]} for r in rows for c in r["captions"]]
    assert canonical == [{"image": r["image"], "caption": r["caption"], "group": r["group"]} for r in rows]
    assert [r["group"] for r in rows] == ["one-object", "two-object"] * 2
