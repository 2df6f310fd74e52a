"""Safe image decoding and CLIP preprocessing.

Untrusted bytes are checked before any pixel is decoded: an allowed format, a pixel count under the
limit (read from the header, so a decompression bomb is refused without being expanded), and a
complete file. Every failure is an `ImageError` with a message fit to return to a client.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 36_000_000  # 6000x6000: above any camera a caption needs, far below a bomb


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, or ImageError."""
    if not data:
        raise ImageError("empty image: no bytes received")
    with warnings.catch_warnings():
        # PIL warns (and only warns) on images between its bomb limit and twice it; we decide ourselves.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:  # PIL refuses > 2x its own limit at open
            raise ImageError(f"image is over the limit of {max_pixels} pixels ({error})") from None
        except UnidentifiedImageError:
            raise ImageError(f"not a recognised image (accepted formats: {', '.join(ALLOWED_FORMATS)})") from None
        if image.format not in ALLOWED_FORMATS:
            raise ImageError(f"image format {image.format} not accepted (accepted: {', '.join(ALLOWED_FORMATS)})")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")
        if width < 1 or height < 1:
            raise ImageError("image has no pixels")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"corrupt or truncated image ({error})") from None
    return image.convert("RGB")


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        return decode_image(path.read_bytes(), max_pixels)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def preprocess(images: list[Image.Image], image_size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """CLIP preprocessing: shorter side to `image_size` (bicubic), centre crop, normalise.

    Returns float32 (B, 3, image_size, image_size).
    """
    mean_a = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_a = np.asarray(std, dtype=np.float32)[:, None, None]
    batch = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        width, height = image.size
        scale = image_size / min(width, height)
        resized = image.resize((max(image_size, round(width * scale)), max(image_size, round(height * scale))),
                               Image.Resampling.BICUBIC)
        left = (resized.width - image_size) // 2
        top = (resized.height - image_size) // 2
        crop = resized.crop((left, top, left + image_size, top + image_size))
        pixels = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch[i] = (pixels - mean_a) / std_a
    return torch.from_numpy(batch)
