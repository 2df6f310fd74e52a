"""Safe image decoding and CLIP preprocessing: `load_pixels(data, ...)` turns untrusted bytes into model input.

Untrusted bytes are checked before any pixel is decoded: a format in the accepted set (only that
format's Pillow plugin may parse the header, so the decoders of rarely used formats never see a
request), a pixel count under the limit (read from the header, so a decompression bomb is refused
without being expanded), decoded bytes under the limit (`decoded_bytes`: 16-bit samples count at
their width), and a complete file. Every failure is an `ImageError` with a message fit to return to
a client. An accepted image adds at most 4x its decoded bytes + 16 MiB to the peak RSS of decoding
and preprocessing it (docs/captioning.md; measured for each accepted kind by tests/test_images.py).

Accepted formats (`FORMATS`; a caller may narrow the set): JPEG, MPO (a JPEG with a multi-picture
index: camera multi-shot, 3-D and gain-map HDR photos; its primary image), PNG and APNG (the default
image), WebP (the first frame when animated), BMP, GIF (the first frame), TIFF (the first page), AVIF,
and HEIC/HEIF (through pillow-heif; the primary image). Every other format Pillow could open is refused:
rarely used decoders are attack surface (EPS runs Ghostscript; PSD, FITS, ... are seldom fuzzed).

Decode no more pixels than preprocessing needs: a JPEG/MPO is decoded with libjpeg's DCT scaling
(`Image.draft`; as fast as simplejpeg's libjpeg-turbo binding, measured side by side) at the smallest of
1/1, 1/2, 1/4, 1/8 whose shorter side is still >= the model's input size (a 4032x3024 photo for a
224 px model decodes at 504x378), and the centre crop is taken where the full decode's would be (a
scaled decode's last pixel may cover part of a block: `Decoded.picture`). On photo-like pictures the
model input then differs from the full decode's by 0.3-0.8 gray levels on average (measured at 224 px
over scales 1/2 and 1/8 and every ratio of decode to input size; bounded by tests/test_images.py).
No other accepted decoder can scale while decoding; those decode whole.

Every accepted image becomes the 8-bit sRGB picture an image viewer shows:
- EXIF orientation 1-8 is applied, so a phone photo stored on its side is captioned upright (HEIF's
  own rotation is applied by libheif); `load_pixels` turns only the cut-out it resamples upright.
- An embedded ICC profile is converted to sRGB with LittleCMS (`ImageCms`, perceptual intent); a
  profile LittleCMS cannot read, or one for another colour space than the pixels', is ignored, as
  browsers do. A CMYK JPEG is read with Adobe's inverted convention when it carries Adobe's APP14
  marker and as plain ink otherwise; a YCCK one (APP14 transform 2, always Adobe's) comes out of
  libjpeg as CMYK. Without a profile, CMYK becomes RGB as (255 - c)(255 - k) / 255.
- Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over white: what a
  browser shows on a white page, and the background people expect behind a cut-out object or a
  logo (over black, dark strokes on a transparent background would vanish).
- High bit depth is scaled by the range of its samples, never clipped at 255: 16-bit samples (modes
  I;16, I;16B, ...) v -> round(v / 257), so 65535 is white; mode I (32-bit int, which Pillow uses for
  16-bit data, e.g. from TIFF) as 16-bit samples too; mode F (float) as 0.0 black .. 1.0 white.
  Values outside those ranges clip. (16-bit RGB PNGs arrive as RGB: Pillow keeps their high byte.)
`to_rgb` applies the last two rules to any PIL image, so `preprocess` accepts every mode.

Extreme aspect ratios are not refused: like CLIP, preprocessing keeps the centre square of the image
(a 6,000,000x6 strip is captioned from its central 6x6 pixels), and only that square is colour-managed
and resampled, so memory stays bounded (see `preprocess_image`).
"""
from __future__ import annotations

import functools
import importlib
import io
import math
import re
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageCms, ImageOps, UnidentifiedImageError

from clipcap.image_formats import DEFAULT_FORMATS, FORMATS, ImageError, check_formats

EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS = 36_000_000  # 6000x6000: above any camera a caption needs, far below a bomb
DEFAULT_MAX_BYTES = 4 * DEFAULT_MAX_PIXELS  # decoded bytes (`decoded_bytes`): any 8-bit image within the pixel limit
CONVERSION_PIXELS = 1 << 18  # to_rgb converts a larger image this many pixels at a time, into the result
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
PROFILED_MODES = ("L", "CMYK")  # modes whose own ICC profile is applied before they become RGB
RESAMPLED_MODES = ("RGB", "L")  # resampled as stored and colour-managed after, at the model's input size
# PIL warns (and only warns) on images between its bomb limit and twice it; `open_image` decides itself.
# A process-wide filter: warnings.catch_warnings is not thread-safe, and batches decode on threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_pixels(data: bytes, image_size: int, mean: list[float], std: list[float],
                formats: Iterable[str] = DEFAULT_FORMATS, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Bytes -> model input float32 (3, image_size, image_size), decoding no more pixels than needed
    (module docstring), or ImageError; never another exception from the bytes."""
    decoded = decode_as_stored(open_image(data, formats, max_pixels), shrink_to=image_size, max_bytes=max_bytes)
    return preprocess_image(decoded.image, image_size, mean, std, decoded.picture, decoded.orientation)


def load_pixels_file(path: str | Path, image_size: int, mean: list[float], std: list[float],
                     formats: Iterable[str] = DEFAULT_FORMATS, max_pixels: int = DEFAULT_MAX_PIXELS,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """`load_pixels` of a file; the ImageError names the file."""
    data = read_image_file(path)
    try:
        return load_pixels(data, image_size, mean, std, formats, max_pixels, max_bytes)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: Iterable[str] = DEFAULT_FORMATS, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Bytes -> the whole upright 8-bit sRGB picture (module rules), or ImageError. `load_pixels` is
    cheaper for model input: it decodes a JPEG at the scale preprocessing needs."""
    decoded = decode_as_stored(open_image(data, formats, max_pixels), max_bytes=max_bytes)
    return to_srgb(decoded.upright(), decoded.image.info.get("icc_profile"))


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                    formats: Iterable[str] = DEFAULT_FORMATS) -> Image.Image:
    """`decode_image` of a file; the ImageError names the file."""
    data = read_image_file(path)
    try:
        return decode_image(data, max_pixels, formats)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes, or an ImageError naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror})") from None


def open_image(data: bytes, formats: Iterable[str] = DEFAULT_FORMATS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an opened, checked, not yet decoded image of an accepted format, or ImageError."""
    if not data:
        raise ImageError("empty image: no bytes received")
    accepted = [FORMATS[name] for name in check_formats(formats)]
    for fmt in accepted:
        if fmt.plugin_module is not None:
            _load_plugin(fmt.plugin_module)
    names = ", ".join(fmt.name for fmt in accepted)
    try:
        image = Image.open(io.BytesIO(data), formats=list(dict.fromkeys(fmt.opener for fmt in accepted)))
    except Image.DecompressionBombError as error:  # PIL refuses > 2x its own limit at open
        raise ImageError(f"image is over the limit of {max_pixels} pixels ({error})") from None
    except UnidentifiedImageError:
        other = _format_by_signature(data)
        if other in {fmt.opener for fmt in accepted} | {fmt.name for fmt in accepted}:  # its plugin refused it
            raise ImageError(f"corrupt {other} image: its header cannot be read") from None
        raise ImageError(f"image format {other} not accepted (accepted: {names})" if other else
                         f"not a recognised image (accepted formats: {names})") from None
    except Exception as error:  # a plugin that recognised the header and choked on it: bad bytes
        raise ImageError(f"corrupt image header ({error})") from None
    if image.format not in {fmt.name for fmt in accepted}:  # e.g. an MPO when only JPEG is accepted
        raise ImageError(f"image format {image.format} not accepted (accepted: {names})")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    if FORMATS[image.format].shrinks_on_load:
        # The bytes are in memory: libjpeg gets them in one read, not Pillow's 64 KiB ones (measured side
        # by side: 2% of a 12 MP photo's scaled decode; its fast Huffman path stops near each read's end).
        image.decodermaxblock = max(image.decodermaxblock, len(data))
    return image


@functools.cache
def _load_plugin(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ImageError(f"this server cannot decode that format: {module} is not installed ({error})") from None


def _format_by_signature(data: bytes) -> str | None:
    """The format the bytes are, by Pillow's prefix checks alone (no decoder runs); None when unsure."""
    if data.endswith(TGA_FOOTER):  # TGA has no leading signature; version 2 files (Pillow's) end with this
        return "TGA"
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) and SIGNATURE_CHECKS.get(name, bool)(data):
                return name
        except Exception:  # a prefix check that fails on these bytes names nothing
            continue
    return None


TGA_FOOTER = b"TRUEVISION-XFILE.\0"
# Prefix checks too weak to name a format alone: CUR's (00 00 02 00) is also how an uncompressed TGA
# without a palette starts, whose next two bytes are 0 where a CUR counts its pictures (at least one).
SIGNATURE_CHECKS = {"CUR": lambda data: data[4:6] != b"\0\0"}


class Decoded(NamedTuple):
    image: Image.Image  # as the file stores it (its mode, its orientation)
    picture: tuple[float, float, float, float]  # where the whole picture lies in `image`, in its pixels
    orientation: int  # EXIF orientation still to apply (1-8; 1: stored upright)

    def upright(self) -> Image.Image:
        """The whole image as a viewer shows it: `orientation` applied, and removed from its EXIF (so
        that nothing downstream applies it twice)."""
        return self.image if self.orientation == 1 else ImageOps.exif_transpose(self.image)


# EXIF orientation -> the transposition that shows the stored pixels upright (what exif_transpose applies) ...
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# ... as (swap x and y, then mirror x, then mirror y).
TRANSPOSITIONS = {1: (False, False, False), 2: (False, True, False), 3: (False, True, True),
                  4: (False, False, True), 5: (True, False, False), 6: (True, True, False),
                  7: (True, True, True), 8: (True, False, True)}


def decode_as_stored(image: Image.Image, shrink_to: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Decoded:
    """Decode an opened image (`open_image`) as stored, with the orientation to apply; `shrink_to`: a
    decoder that can scale (`ImageFormat.shrinks_on_load`) stops at the smallest scale with both sides
    >= shrink_to. A scaled decode's last row and column may cover part of a pixel: `picture` says where
    the picture lies. (Pillow's TIFF loader and libheif apply their orientation while decoding.)
    An image whose `decoded_bytes` are over `max_bytes` is refused before decoding (after scaling is
    chosen), and after it when the decoder made it larger than its header said."""
    try:
        drafted = None
        if shrink_to is not None and FORMATS[image.format].shrinks_on_load:
            drafted = image.draft(None, (shrink_to, shrink_to))  # both sides >= shrink_to: the shorter one is too
            if drafted is not None:
                width, height = drafted[1][2:]  # the whole picture, in the scaled decode's pixels
        _check_bytes(image, max_bytes)
        image.load()
        if getattr(image, "_decoder", None) is not None:  # WebP's and AVIF's plugins keep libwebp's / libavif's
            image._decoder = None  # decoder and its frame buffers (up to 8 bytes a pixel) until the file closes
        if drafted is None:  # the size decoded, not the header's: a corrupt HEIF crop box can disagree
            width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)  # read after load: a loader may apply it
    except (MemoryError, ImageError):
        raise
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"corrupt or truncated image ({error})") from None
    _check_bytes(image, max_bytes)
    if image.mode == "CMYK" and image.format in ("JPEG", "MPO") and "adobe" not in image.info:
        image = ImageChops.invert(image)  # Pillow reads every CMYK JPEG as Adobe's inverted ink
    return Decoded(image, (0.0, 0.0, width, height), orientation if orientation in UPRIGHT else 1)


BANDS = {"RGBA": 4, "RGBa": 4, "RGB": 3, "CMYK": 4, "YCbCr": 3, "LA": 2, "La": 2, "PA": 2}  # others: 1


def decoded_bytes(image: Image.Image) -> int:
    """What decoding an opened image costs, in bytes, known before it is decoded: its pixels (as decoded:
    a JPEG's after `Image.draft`) times 4 (a pixel of Pillow's RGB, RGBA, CMYK, I or F, and of the RGB
    picture every image becomes), or times the bytes a pixel holds in the file when more: 16-, 32- and
    64-bit samples take 2, 4 and 8 bytes a band (a 16-bit RGBA PNG, which Pillow reads into 8-bit RGBA,
    costs 8 a pixel to inflate). Only the first frame is ever decoded: one frame is kept."""
    sample = 1
    for tile in image.tile:  # the raw mode the decoder reads names wide samples: "RGBA;16B", "F;32F", ...
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        rawmode = next((arg for arg in args if isinstance(arg, str)), "")
        wide = re.match(r"[A-Za-z]+;(16|32|64)", rawmode)  # not BMP's packed "BGR;16" (5-6-5 bits)
        if wide and not rawmode.startswith("BGR;"):
            sample = max(sample, int(wide.group(1)) // 8)
    if (image.info.get("bit_depth") or 8) > 8:  # HEIF of 10 or 12 bits: libheif decodes 16-bit samples first
        sample = max(sample, 2)
    return image.width * image.height * max(4, BANDS.get(image.mode, 1) * sample)


def _check_bytes(image: Image.Image, max_bytes: int) -> None:
    size = decoded_bytes(image)
    if size > max_bytes:
        raise ImageError(f"image is {image.width}x{image.height} {image.mode}, {size} bytes decoded, over the limit "
                         f"of {max_bytes} decoded bytes")


def _upright_box(box: tuple[float, float, float, float], size: tuple[int, int],
                orientation: int) -> tuple[float, float, float, float]:
    """A box in a stored image of `size` -> the box of the same pixels once `orientation` is applied."""
    swap, mirror_x, mirror_y = TRANSPOSITIONS[orientation]
    x0, y0, x1, y1 = (box[1], box[0], box[3], box[2]) if swap else box
    width, height = size[::-1] if swap else size
    if mirror_x:
        x0, x1 = width - x1, width - x0
    if mirror_y:
        y0, y1 = height - y1, height - y0
    return x0, y0, x1, y1


def _stored_box(box: tuple[int, int, int, int], size: tuple[int, int], orientation: int) -> tuple[int, int, int, int]:
    """A box in the upright image of `size` -> the box of the same pixels as stored (`_upright_box` undone)."""
    swap, mirror_x, mirror_y = TRANSPOSITIONS[orientation]
    width, height = size
    x0, y0, x1, y1 = box
    if mirror_y:
        y0, y1 = height - y1, height - y0
    if mirror_x:
        x0, x1 = width - x1, width - x0
    return (y0, x0, y1, x1) if swap else (x0, y0, x1, y1)


def to_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """Any PIL image -> 8-bit sRGB: the ICC `profile` (the image's own, or None) applied (module
    docstring), then `to_rgb`."""
    if not profile:
        return to_rgb(image)
    if image.mode not in PROFILED_MODES:
        image = to_rgb(image)  # palettes expanded, alpha over white: RGB, which an RGB profile describes
    transform = _srgb_transform(bytes(profile), image.mode)
    if transform is not None:
        image = transform.apply(image)
    return to_rgb(image)


@functools.lru_cache(maxsize=16)
def _srgb_transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS's transform from `profile` in `mode` to sRGB; None when the profile is unreadable or not
    for that mode's colour space (ignored, as browsers do)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.ImageCmsTransform(source, _srgb_profile(), mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: alpha composited over white, high bit depth scaled (module docstring).
    A large image is converted CONVERSION_PIXELS at a time into the result (every rule is per pixel), so
    the conversion costs the result (4 bytes a pixel) and a few bands of rows, never copies of the whole."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    rows = max(1, CONVERSION_PIXELS // image.width)
    if image.height <= rows:
        return _to_rgb(image)
    result = Image.new("RGB", image.size)
    for top in range(0, image.height, rows):
        result.paste(_to_rgb(image.crop((0, top, image.width, min(image.height, top + rows)))), (0, top))
    return result


def _to_rgb(image: Image.Image) -> Image.Image:
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


def preprocess(images: list[Image.Image], image_size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """CLIP preprocessing of a batch (`preprocess_image` per image). Returns float32 (B, 3, image_size, image_size)."""
    batch = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_image(image, image_size, mean, std)
    return batch


def preprocess_image(image: Image.Image, image_size: int, mean: list[float], std: list[float],
                     picture: tuple[float, float, float, float] | None = None, orientation: int = 1) -> np.ndarray:
    """CLIP preprocessing of one image: shorter side to `image_size` (bicubic), centre crop, normalise.

    Any mode is accepted (`to_srgb`; the image's ICC profile, if any, is applied). Crop before anything
    else: only the pixels the bicubic filter reads for the centre square are cut out and resampled, at
    the filter positions of resizing the whole image, so the result equals the resize-then-crop path up to one 8-bit level per
    resampling pass (Pillow takes the box in float32) on all but a few samples: Pillow picks the order
    of its two passes by the sizes, and where it runs them in the other order on the cut-out and the
    first clips bicubic overshoot, a sample moves by a few levels (measured on smooth images with
    grain: at most 4 levels, on at most 0.3% of samples; bounded by tests/test_images.py), while memory
    no longer grows with the long side. With
    s = min(w, h) and m = 2 * max(1, s / image_size) + 2, preprocessing allocates, beyond the image:
    the cut-out, at most (s + 2m)^2 pixels and never more than the image (and its RGB / sRGB copies
    when the mode is not RGB or a profile is embedded); Pillow's horizontal pass, image_size x (s + 2m)
    pixels (4 bytes a pixel in Pillow); and a few float32 arrays of 3 x image_size^2. A 6,000,000x6
    strip costs kilobytes, where resizing it whole made a 64,000,000x64 intermediate (~16 GB).
    tests/test_images.py measures a strip's peak RSS. RGB and L images are resampled as stored and
    converted to sRGB after, on image_size^2 pixels (a third of the colour-management cost of a phone
    JPEG's 504x378 decode; tests/test_images.py bounds the difference to converting first); other modes
    become sRGB on the cut-out. `picture` (`Decoded.picture`; None: the whole image): the centre square
    is taken of that box, so a JPEG decoded at 1/8 is cropped where its full decode would be.
    `orientation` (`Decoded.orientation`): the EXIF orientation of the stored `image`; only the cut-out
    is turned upright (the same pixels, exactly, as cutting the upright image; a phone JPEG's 504x378
    decode is not transposed whole).
    Returns float32 (3, image_size, image_size).
    """
    profile = image.info.get("icc_profile")
    swap = TRANSPOSITIONS[orientation][0]
    upright_size = image.size[::-1] if swap else image.size
    x0, y0, x1, y1 = _upright_box(picture or (0, 0, *image.size), image.size, orientation)
    width, height = x1 - x0, y1 - y0
    scale = image_size / min(width, height)
    # The size the whole picture would be resized to, and CLIP's centre crop of it, in its pixels...
    resized_w, resized_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    left, top = (resized_w - image_size) // 2, (resized_h - image_size) // 2
    # ... mapped back onto the image, where Pillow resamples that box at the same filter positions.
    x_step, y_step = width / resized_w, height / resized_h
    box = (x0 + left * x_step, y0 + top * y_step, x0 + (left + image_size) * x_step, y0 + (top + image_size) * y_step)
    # The bicubic filter reads 2 * max(1, step) source pixels either side of a position (+1 for rounding).
    margin_x, margin_y = math.ceil(2 * max(1.0, x_step)) + 1, math.ceil(2 * max(1.0, y_step)) + 1
    region = (max(0, math.floor(box[0]) - margin_x), max(0, math.floor(box[1]) - margin_y),
              min(upright_size[0], math.ceil(box[2]) + margin_x), min(upright_size[1], math.ceil(box[3]) + margin_y))
    stored_region = _stored_box(region, upright_size, orientation)
    cut = image if stored_region == (0, 0, *image.size) else image.crop(stored_region)
    if orientation in UPRIGHT:
        cut = cut.transpose(UPRIGHT[orientation])  # only the cut-out is turned upright, not the whole image
    if cut.mode not in RESAMPLED_MODES:
        cut, profile = to_srgb(cut, profile), None
    # Resampling the box on the cut-out, not on the whole image: on the whole image Pillow's 8-bit result
    # differed from resize-then-crop by up to 22 levels (a 37x500 noise image upscaled); here by at most 1.
    crop = cut.resize((image_size, image_size), Image.Resampling.BICUBIC,
                      box=(box[0] - region[0], box[1] - region[1], box[2] - region[0], box[3] - region[1]))
    pixels = np.asarray(to_srgb(crop, profile), dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean_a = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_a = np.asarray(std, dtype=np.float32)[:, None, None]
    return (pixels - mean_a) / std_a
