"""Photo-sized inputs made here, and the ways of turning them into model input that the photo profile compares.

Inputs (`photo_inputs`): a 12 MP JPEG as a phone writes it (4032x3024 stored on its side with EXIF
Orientation 6, a Display P3 ICC profile), the same picture as a 12 MP HEIC, and a 4K PNG. The
picture is photo-like: smooth colour fields, mid-scale detail and sensor grain, so a codec and a
shrinking decoder see what they see in a photo, not noise or flat colour.

Pipelines (`PIPELINES`), each bytes -> (3, S, S) float32 model input with its stage times:
- clipcap: `clipcap.images.load_pixels` (shrink on load, orientation, ICC -> sRGB, crop-first bicubic);
- open_clip: a full Pillow decode, upright, then open_clip's own eval transform (what its users run);
- pillow-full: a full Pillow decode and `clipcap.images.preprocess_image` (our path before shrink on load);
- simplejpeg: libjpeg-turbo's scaled decode through simplejpeg (JPEG only; no orientation, no ICC),
  then `preprocess_image`;
- pyvips: libvips `thumbnail_buffer` (shrink on load, autorotate, ICC import), centre crop, normalise.
The last two run only where their optional packages are installed (`pip install .[photo]`).
"""
from __future__ import annotations

import io
import struct
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from clipcap.images import decode_image, load_pixels, open_image, preprocess_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
D50 = (0.9642, 1.0, 0.8249)  # the ICC profile connection space's white
DISPLAY_P3 = ((0.51512, 0.24119, -0.00105), (0.29198, 0.69225, 0.04189), (0.15710, 0.06657, 0.78407))  # D50
ORIENTATION = 0x0112


def display_profile(colorants=DISPLAY_P3, gamma: float = 2.2, description: str = "Display P3 (gamma 2.2)") -> bytes:
    """A minimal ICC v2 RGB display profile: three colorants (XYZ under D50) and one gamma curve."""
    curve = _curve(gamma)
    return _icc_profile(b"RGB ", [(b"desc", _text(description)), (b"wtpt", _xyz(D50)),
                                  (b"rXYZ", _xyz(colorants[0])), (b"gXYZ", _xyz(colorants[1])),
                                  (b"bXYZ", _xyz(colorants[2])),
                                  (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)])


def gray_profile(gamma: float, description: str = "gray") -> bytes:
    """A minimal ICC v2 grayscale profile: a gamma curve from the sample to luminance."""
    return _icc_profile(b"GRAY", [(b"desc", _text(description)), (b"wtpt", _xyz(D50)), (b"kTRC", _curve(gamma))])


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(value) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in value)


def _curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)  # u8Fixed8 gamma, padded


def _text(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


def _icc_profile(colour_space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    table_end = 128 + 4 + 12 * len(tags)
    entries, data, offset = [], b"", table_end
    for signature, body in tags:
        entries.append(struct.pack(">4sII", signature, offset, len(body)))
        padded = body + bytes(-len(body) % 4)
        data += padded
        offset += len(padded)
    header = (struct.pack(">I4sI4s4s4s", offset, b"none", 0x02100000, b"mntr", colour_space, b"XYZ ")
              + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + b"".join(_s15(v) for v in D50)
              + bytes(4 + 16 + 28))
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with a photo's spectrum: colour fields, detail at ~1/24 of the width, grain."""
    rng = np.random.default_rng(seed)
    fields = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.Resampling.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (max(1, height // 24), max(1, width // 24), 3), dtype=np.uint8))
    detail = detail.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(fields, dtype=np.int16) * 3 // 4 + np.asarray(detail, dtype=np.int16) // 4
    pixels += rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def phone_jpeg(width: int = 4032, height: int = 3024, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG as a phone writes one: stored on its side (EXIF Orientation 6) with a Display P3 profile."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    photo_like(width, height, seed).save(buffer, format="JPEG", quality=quality, exif=exif.tobytes(),
                                         icc_profile=display_profile())
    return buffer.getvalue()


def photo_inputs(seed: int = 0) -> dict[str, bytes]:
    """The photo profile's inputs, by name: 12 MP JPEG (EXIF 6 + ICC), 12 MP HEIC, 4K PNG."""
    import pillow_heif

    photo = photo_like(4032, 3024, seed)
    heic = io.BytesIO()
    pillow_heif.from_pillow(photo).save(heic, quality=85, enc_params={"preset": "ultrafast"})  # x265: seconds, not minutes
    png = io.BytesIO()
    photo_like(3840, 2160, seed + 1).save(png, format="PNG", compress_level=6)
    return {"jpeg-12mp": phone_jpeg(seed=seed), "heic-12mp": heic.getvalue(), "png-4k": png.getvalue()}


# -- pipelines -----------------------------------------------------------------------------------

Timed = tuple[torch.Tensor, dict[str, float]]  # model input and milliseconds per stage


@dataclass(frozen=True)
class Pipeline:
    name: str
    run: Callable[[bytes, int], Timed]  # (bytes, image size) -> model input, stage times
    formats: tuple[str, ...] | None = None  # None: every input; else the formats (Pillow's names) it reads
    module: str | None = None  # an optional package it needs


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _clipcap(data: bytes, size: int) -> Timed:
    start = time.perf_counter()
    pixels = load_pixels(data, size, list(CLIP_MEAN), list(CLIP_STD))
    return pixels, {"total": _ms(start)}


def _open_clip(data: bytes, size: int) -> Timed:
    from open_clip.transform import image_transform

    transform = _open_clip_transform(size, image_transform)
    start = time.perf_counter()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    decoded = time.perf_counter()
    pixels = transform(image)
    return pixels, {"decode": (decoded - start) * 1e3, "preprocess": _ms(decoded), "total": _ms(start)}


_TRANSFORMS: dict[int, Callable] = {}


def _open_clip_transform(size: int, factory) -> Callable:
    if size not in _TRANSFORMS:
        _TRANSFORMS[size] = factory(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    return _TRANSFORMS[size]


def _pillow_full(data: bytes, size: int) -> Timed:
    start = time.perf_counter()
    image = decode_image(data)
    decoded = time.perf_counter()
    pixels = preprocess_image(image, size, list(CLIP_MEAN), list(CLIP_STD))
    return pixels, {"decode": (decoded - start) * 1e3, "preprocess": _ms(decoded), "total": _ms(start)}


def _simplejpeg(data: bytes, size: int) -> Timed:
    import simplejpeg

    start = time.perf_counter()
    array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size, min_height=size)
    decoded = time.perf_counter()
    pixels = preprocess_image(Image.fromarray(array), size, list(CLIP_MEAN), list(CLIP_STD))
    return pixels, {"decode": (decoded - start) * 1e3, "preprocess": _ms(decoded), "total": _ms(start)}


def _pyvips(data: bytes, size: int) -> Timed:
    import pyvips

    start = time.perf_counter()
    thumbnail = pyvips.Image.thumbnail_buffer(data, size, height=size, crop="centre", export_profile="srgb")
    array = np.ndarray(buffer=thumbnail.write_to_memory(), dtype=np.uint8,
                       shape=(thumbnail.height, thumbnail.width, thumbnail.bands))[..., :3]
    decoded = time.perf_counter()
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    pixels = torch.from_numpy(((array.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1).copy())
    return pixels, {"decode": (decoded - start) * 1e3, "preprocess": _ms(decoded), "total": _ms(start)}


PIPELINES = {p.name: p for p in (
    Pipeline("clipcap", _clipcap),
    Pipeline("open_clip", _open_clip),
    Pipeline("pillow-full", _pillow_full),
    Pipeline("simplejpeg", _simplejpeg, formats=("JPEG", "MPO"), module="simplejpeg"),
    Pipeline("pyvips", _pyvips, module="pyvips"),
)}


def input_format(data: bytes) -> str:
    return open_image(data).format
