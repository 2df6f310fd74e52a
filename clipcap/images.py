"""Safe image decoding and CLIP preprocessing.

Untrusted bytes are checked before any pixel is decoded: an allowed format, a pixel count under the
limit (read from the header, so a decompression bomb is refused without being expanded), and a
complete file. Every failure is an `ImageError` with a message fit to return to a client.

Every accepted image becomes the 8-bit RGB picture an image viewer shows:
- EXIF orientation 1-8 is applied (`ImageOps.exif_transpose`), so a phone photo stored on its side
  is captioned upright.
- Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over white: what a
  browser shows on a white page, and the background people expect behind a cut-out object or a
  logo (over black, dark strokes on a transparent background would vanish).
- High bit depth is scaled by the range of its samples, never clipped at 255: 16-bit samples (modes
  I;16, I;16B, ...) v -> round(v / 257), so 65535 is white; mode I (32-bit int, which Pillow uses for
  16-bit data, e.g. from TIFF) as 16-bit samples too; mode F (float) as 0.0 black .. 1.0 white.
  Values outside those ranges clip. (16-bit RGB PNGs arrive as RGB: Pillow keeps their high byte.)
`to_rgb` applies the last two rules to any PIL image, so `preprocess` accepts every mode.

Extreme aspect ratios are not refused: like CLIP, preprocessing keeps the centre square of the image
(a 6,000,000x6 strip is captioned from its central 6x6 pixels), and only that square is resampled,
so memory stays bounded (see `preprocess_image`).
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 36_000_000  # 6000x6000: above any camera a caption needs, far below a bomb
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> upright 8-bit RGB PIL image (module rules), or ImageError; never another exception."""
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
        except Exception as error:  # a plugin that recognised the header and choked on it: bad bytes
            raise ImageError(f"corrupt image header ({error})") from None
        if image.format not in ALLOWED_FORMATS:
            raise ImageError(f"image format {image.format} not accepted (accepted: {', '.join(ALLOWED_FORMATS)})")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")
        if width < 1 or height < 1:
            raise ImageError("image has no pixels")
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when already upright
        except MemoryError:
            raise
        except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise ImageError(f"corrupt or truncated image ({error})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: alpha composited over white, high bit depth scaled (module docstring)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        samples = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((samples + 128) // 257).astype(np.uint8), "L")  # round(v / 257)
    elif image.mode == "F":
        samples = np.nan_to_num(np.clip(np.asarray(image), 0.0, 1.0), nan=0.0)
        image = Image.fromarray(np.rint(samples * 255).astype(np.uint8), "L")
    try:
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)  # palette / colour-key transparency -> alpha
            alpha = rgba[..., 3:]
            # c over white: c * a/255 + 255 * (1 - a/255), rounded; at most 65025 + 127, fits uint16
            rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
            return Image.fromarray(rgb.astype(np.uint8), "RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as error:  # a mode Pillow cannot convert
        raise ImageError(f"image mode {image.mode} cannot be read as RGB ({error})") from None


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        return decode_image(path.read_bytes(), max_pixels)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def preprocess(images: list[Image.Image], image_size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """CLIP preprocessing of a batch (`preprocess_image` per image). Returns float32 (B, 3, image_size, image_size)."""
    batch = torch.empty((len(images), 3, image_size, image_size), dtype=torch.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_image(image, image_size, mean, std)
    return batch


def preprocess_image(image: Image.Image, image_size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """CLIP preprocessing of one image: shorter side to `image_size` (bicubic), centre crop, normalise.

    Any mode is accepted (`to_rgb`). Crop before resize: only the pixels the bicubic filter reads
    for the centre square are cut out and resampled, at the filter positions of resizing the whole
    image, so the result equals the resize-then-crop path up to one 8-bit level per resampling pass
    (Pillow takes the box in float32; measured on photo-like and noise images: at most 1 level, on
    under 0.02% of samples) while memory no longer grows with the long side. With s = min(w, h) and
    m = 2 * max(1, s / image_size) + 2, preprocessing allocates, beyond the image (and its RGB copy
    when the mode is not RGB): the cut-out, at most (s + 2m)^2 pixels and never more than the image;
    Pillow's horizontal pass, image_size x (s + 2m) pixels (4 bytes a pixel in Pillow); and a few
    float32 arrays of 3 x image_size^2. A 6,000,000x6 strip costs kilobytes, where resizing it whole
    made a 64,000,000x64 intermediate (~16 GB). tests/test_images.py measures a strip's peak RSS.
    Returns float32 (3, image_size, image_size).
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    width, height = image.size
    scale = image_size / min(width, height)
    # The size the whole image would be resized to, and CLIP's centre crop of it, in its pixels...
    resized_w, resized_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    left, top = (resized_w - image_size) // 2, (resized_h - image_size) // 2
    # ... mapped back onto the image, where Pillow resamples that box at the same filter positions.
    x_step, y_step = width / resized_w, height / resized_h
    box = (left * x_step, top * y_step, (left + image_size) * x_step, (top + image_size) * y_step)
    # The bicubic filter reads 2 * max(1, step) source pixels either side of a position (+1 for rounding).
    margin_x, margin_y = math.ceil(2 * max(1.0, x_step)) + 1, math.ceil(2 * max(1.0, y_step)) + 1
    region = (max(0, math.floor(box[0]) - margin_x), max(0, math.floor(box[1]) - margin_y),
              min(width, math.ceil(box[2]) + margin_x), min(height, math.ceil(box[3]) + margin_y))
    cut = image if region == (0, 0, width, height) else image.crop(region)
    # Resampling the box on the cut-out, not on the whole image: on the whole image Pillow's 8-bit result
    # differed from resize-then-crop by up to 22 levels (a 37x500 noise image upscaled); here by at most 1.
    crop = cut.resize((image_size, image_size), Image.Resampling.BICUBIC,
                      box=(box[0] - region[0], box[1] - region[1], box[2] - region[0], box[3] - region[1]))
    pixels = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean_a = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_a = np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((pixels - mean_a) / std_a)
