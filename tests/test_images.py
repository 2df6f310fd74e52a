"""Image decoding and preprocessing, as properties over modes, formats, EXIF orientations and sizes.

Every expected picture is built here with numpy from what the file stores (Pillow's raw decode, no
conversion) and the EXIF specification, never with the code under test: a valid image must decode
to exactly its upright 8-bit RGB rendition (alpha over white, 16-bit scaled by 257) and preprocess
to the same pixels; invalid bytes raise ImageError and nothing else.
"""
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pillow_heif
import pillow_heif.HeifImagePlugin  # noqa: F401  (registers the HEIF writer the tests save with)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipcap.images import (DEFAULT_FORMATS, FORMATS, ImageError, check_formats, decode_image, decoded_bytes,
                            decode_as_stored, load_pixels, open_image, preprocess, preprocess_image, to_rgb)
from clipcap_bench.photos import display_profile, gray_profile, photo_like
from conftest import png_bytes, random_images

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Modes each format can store (Pillow's and pillow-heif's writers); "P+key" / "P+alpha": palette with a
# transparent index / a per-index alpha table.
SAVED_MODES = {
    "PNG": ["1", "L", "LA", "P", "P+key", "P+alpha", "I;16", "RGB", "RGBA"],
    "JPEG": ["L", "RGB", "CMYK", "YCbCr"],
    "MPO": ["L", "RGB"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P", "P+key"],
    "TIFF": ["1", "L", "LA", "P", "I;16", "RGB", "RGBA", "CMYK"],
    "AVIF": ["L", "RGB", "RGBA"],
    "HEIF": ["L", "RGB", "RGBA"],
}
EXIF_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "TIFF", "AVIF", "HEIF")
ANIMATED_FORMATS = ("PNG", "WEBP", "GIF", "TIFF", "MPO", "AVIF", "HEIF")  # more than one frame (or page)
TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg")
REFUSED_WRITABLE = ("EPS", "PPM", "ICO", "PCX", "SGI", "QOI")  # Pillow opens them; we refuse and name them
ORIENTATION = 0x0112


def oriented(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for EXIF Orientation 1-8 (rows are y, columns x), from the EXIF 2.3 table."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: show it turned clockwise
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # mirrored along the anti-diagonal
        8: lambda a: np.rot90(a, 1),  # stored rotated 90 clockwise: show it turned counter-clockwise
    }[orientation](stored)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    colour, alpha = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.rint((colour * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)


def rendition(raw: Image.Image) -> np.ndarray:
    """8-bit RGB of a raw decoded image by the documented rules, written independently of clipcap."""
    data = np.asarray(raw)
    grey = lambda g: np.repeat(g[..., None], 3, axis=2).astype(np.uint8)  # noqa: E731
    if raw.mode == "1":
        return grey(data.astype(np.uint8) * 255)
    if raw.mode == "L":
        return grey(data)
    if raw.mode == "I;16":
        return grey(np.rint(data / 257.0))
    if raw.mode == "LA":
        return over_white(grey(data[..., 0]), data[..., 1])
    if raw.mode == "RGBA":
        return over_white(data[..., :3], data[..., 3])
    if raw.mode == "CMYK":
        ink = data.astype(np.float64)
        return np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255).astype(np.uint8)
    if raw.mode == "P":
        palette = np.asarray(raw.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)])
        transparency = raw.info.get("transparency")
        alpha = np.full(256, 255, np.uint8)
        if isinstance(transparency, int):
            alpha[transparency] = 0
        elif isinstance(transparency, bytes):
            alpha[:len(transparency)] = np.frombuffer(transparency, np.uint8)
        return over_white(palette[data], alpha[data])
    assert raw.mode == "RGB" and "transparency" not in raw.info, f"test does not render {raw.mode}"
    return data


def stored_image(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    byte = lambda *shape: rng.integers(0, 256, (height, width, *shape), dtype=np.uint8)  # noqa: E731
    if mode == "1":
        return Image.fromarray(byte() > 127)
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr"):
        bands = len(mode) if mode != "YCbCr" else 3
        return Image.fromarray(byte() if bands == 1 else byte(bands), mode)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    image = Image.fromarray(rng.integers(0, 16, (height, width), dtype=np.uint8), "P")
    image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
    if mode == "P+key":
        image.info["transparency"] = int(rng.integers(0, 16))
    elif mode == "P+alpha":
        image.info["transparency"] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return image


def encode(image: Image.Image, fmt: str, orientation: int, later_frames: list[Image.Image] = (),
           **options) -> bytes:
    """`image` in `fmt`; `later_frames` after it (animation frames, TIFF pages, MPO pictures)."""
    if fmt == "WEBP":
        options["lossless"] = True
    if "transparency" in image.info:
        options["transparency"] = image.info["transparency"]
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    if later_frames:
        options.update(save_all=True, append_images=list(later_frames))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# Sizes from 1x1 to strips of 1:12000; WEBP stops at 16383 pixels a side.
ordinary = st.tuples(st.integers(1, 40), st.integers(1, 40))
strips = st.tuples(st.integers(2000, 12000), st.integers(1, 3)).flatmap(
    lambda wh: st.sampled_from([wh, wh[::-1]]))
SIZES = st.one_of(ordinary, ordinary, strips)


MAX_SIDE = {"WEBP": 16383, "AVIF": 4096, "HEIF": 4096}  # the largest side their encoders write here


@st.composite
def valid_images(draw):
    fmt = draw(st.sampled_from(sorted(SAVED_MODES)))
    mode = draw(st.sampled_from(SAVED_MODES[fmt]))
    orientation = draw(st.integers(1, 8)) if fmt in EXIF_FORMATS else 1
    size = draw(SIZES.filter(lambda wh: max(wh) <= MAX_SIDE.get(fmt, 65535)))
    if fmt in ("AVIF", "HEIF"):  # their encoders refuse sides of one pixel and take long on strips
        size = (max(2, min(size[0], 64)), max(2, min(size[1], 64)))
    # An MPO holds two pictures or more; Pillow's AVIF encoder crashes on EXIF with several frames.
    frames = draw(st.integers(2 if fmt == "MPO" else 1, 3)) if fmt in ANIMATED_FORMATS else 1
    if fmt == "AVIF" and frames > 1:
        orientation = 1
    if fmt == "PNG" and "+" in mode:  # Pillow's APNG writer takes no palette transparency
        frames = 1
    options = {"compression": draw(st.sampled_from(TIFF_COMPRESSIONS if mode in ("L", "RGB") else
                                                   TIFF_COMPRESSIONS[:-1]))} if fmt == "TIFF" else {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    first, *later = [stored_image(mode, size, rng) for _ in range(frames)]
    return fmt, mode, orientation, encode(first, fmt, orientation, later, **options)


@PROPERTY
@given(valid_images(), st.sampled_from([32, 224]))
def test_every_valid_image_decodes_to_its_upright_rgb_rendition(case, image_size):
    """Every accepted format x mode x orientation x frame count: the first frame's upright 8-bit
    rendition, exactly; and the one call, load_pixels, preprocesses exactly like it (these images are
    too small for shrink on load, which the photo tests below bound)."""
    fmt, mode, orientation, data = case
    raw = Image.open(io.BytesIO(data))  # what the file stores, decoded by Pillow without conversion
    assert raw.format == fmt
    raw.load()  # Pillow's TIFF loader (single page) and libheif apply the orientation and drop the tag
    expected = np.ascontiguousarray(oriented(rendition(raw), raw.getexif().get(ORIENTATION, 1)))
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), expected), (fmt, mode, orientation, raw.mode, raw.size)
    pixels = preprocess_image(decoded, image_size, MEAN, STD)
    assert np.array_equal(pixels, preprocess_image(Image.fromarray(expected), image_size, MEAN, STD))
    assert np.array_equal(load_pixels(data, image_size, MEAN, STD), pixels)


def test_16_bit_png_and_phone_orientation():
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(4, axis=0)  # black .. white
    decoded = np.asarray(decode_image(png_bytes(Image.fromarray(ramp))))
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[0, -1].tolist() == [255, 255, 255]  # not all white
    # A phone JPEG stored on its side: red left, blue right; Orientation 6 shows red on top.
    stored = Image.new("RGB", (64, 32), "blue")
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    decoded = decode_image(encode(stored, "JPEG", 6))
    assert decoded.getexif().get(ORIENTATION, 1) == 1  # applied once, and not left to apply again
    upright = np.asarray(decoded).astype(int)
    assert upright.shape == (64, 32, 3)
    assert upright[8, 16, 0] > 200 > upright[56, 16, 0]  # red above, blue below


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 30))
def test_high_bit_depth_modes_scale_by_their_range(seed, width, height):
    grey = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    expected = np.repeat(grey[..., None], 3, axis=2)
    sixteen = grey.astype(np.uint16) * 257  # 8-bit g stored as 16-bit: 255 -> 65535
    for image in (Image.fromarray(sixteen), Image.fromarray(sixteen.astype(">u2")),
                  Image.fromarray(sixteen.astype(np.int32), "I"), Image.fromarray(grey / np.float32(255), "F")):
        assert np.array_equal(np.asarray(to_rgb(image)), expected), image.mode


def test_out_of_range_high_bit_depth_clips():
    values = np.array([[-5, 70000]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(values, "I")))[0, :, 0].tolist() == [0, 255]
    floats = np.array([[-0.5, 2.0, np.nan]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(floats, "F")))[0, :, 0].tolist() == [0, 255, 0]


# -- invalid bytes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"this is not an image", "not a recognised image"),
    (png_bytes(random_images(1)[0])[:200], "corrupt or truncated"),
    *[(png_bytes(Image.new("RGB", (4, 4)), fmt), f"format {fmt} not accepted") for fmt in REFUSED_WRITABLE],
])
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


@PROPERTY
@given(valid_images(), st.data())
def test_truncated_images_are_refused_or_unchanged(case, data):
    """A cut file raises ImageError, or (cut only after the pixel data) decodes to the same picture."""
    _, _, _, encoded = case
    cut = encoded[:data.draw(st.integers(0, len(encoded) - 1))]
    try:
        decoded = decode_image(cut)
    except ImageError:
        return
    assert np.array_equal(np.asarray(decoded), np.asarray(decode_image(encoded)))


@PROPERTY
@given(valid_images(), st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_images_raise_image_error_or_decode(case, edits):
    """Bytes changed anywhere (header, EXIF, pixel data) give ImageError or an RGB image, nothing else."""
    _, _, _, encoded = case
    corrupted = bytearray(encoded)
    for position, value in edits:
        corrupted[position % len(corrupted)] = value
    try:
        assert decode_image(bytes(corrupted), max_pixels=1_000_000).mode == "RGB"
    except ImageError:
        pass


@PROPERTY
@given(st.binary(max_size=2000))
def test_random_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_image(data)


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@PROPERTY
@given(st.sampled_from(["RGB", "RGBA", "L"]), st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_a_tga_file_is_named_tga_or_not_recognised_never_cur(mode, width, height, rle):
    """TGA has no leading signature, and an uncompressed one without a palette starts like a CUR."""
    tga = image_bytes(Image.new(mode, (width, height)), "TGA", rle=rle)
    with pytest.raises(ImageError, match="image format TGA not accepted"):
        decode_image(tga)
    footerless = tga[:-26]  # a version 1 TGA: nothing says what it is
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(footerless)
    ico = image_bytes(Image.new("RGBA", (width, height)), "ICO")
    cur = ico[:2] + b"\2" + ico[3:]  # a cursor is an icon file of type 2
    with pytest.raises(ImageError, match="image format CUR not accepted"):
        decode_image(cur)


@PROPERTY
@given(st.sampled_from(sorted(SAVED_MODES)), st.integers(4, 40))
def test_a_broken_header_of_an_accepted_format_says_so(fmt, cut):
    """A file of an accepted format whose header its plugin cannot read is a corrupt file of that
    format, not a format refused."""
    encoded = encode(stored_image(SAVED_MODES[fmt][0], (20, 20), np.random.default_rng(cut)), fmt, 1)
    try:
        open_image(encoded[:cut])
    except ImageError as error:
        assert "not accepted" not in str(error)
    tiff = image_bytes(Image.new("RGB", (8, 6)), "TIFF")
    with pytest.raises(ImageError, match="corrupt TIFF image"):
        decode_image(tiff[:4 + cut // 2])
    with pytest.raises(ImageError, match="format TIFF not accepted"):
        decode_image(tiff[:4 + cut // 2], formats=["PNG"])


def heif_with_crop_field(field: int, value: int) -> bytes:
    """A 40x30 HEIF (coded as 64x64, cropped by its clean-aperture box) with one of the box's eight
    32-bit fields (width, height, horizontal and vertical offset, each a numerator and a denominator) set."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    data = bytearray(image_bytes(picture, "HEIF"))
    clap = data.find(b"clap")
    assert clap > 0 and int.from_bytes(data[clap + 4: clap + 8], "big") == 40
    data[clap + 4 + 4 * field: clap + 8 + 4 * field] = value.to_bytes(4, "big")
    return bytes(data)


# Fields and values whose box pillow-heif 1.9 reports at open while libheif decodes another size
# (the width: 100 opens as 100x30 and decodes 64x30; a huge horizontal offset decodes wider than it opened).
@pytest.mark.parametrize("field, value", [(0, 100), (2, 100), (4, 2**31), (5, 1)])
def test_a_heif_whose_crop_box_disagrees_with_its_decode_is_captioned_from_what_decodes(field, value):
    """libheif reports a corrupt crop box's size at open and decodes another size: the decoded one holds."""
    data = heif_with_crop_field(field, value)
    image = open_image(data)
    opened = image.size
    decoded = decode_as_stored(image, shrink_to=32)
    assert decoded.image.size != opened  # the case itself
    assert decoded.picture == (0.0, 0.0, *decoded.image.size)
    assert load_pixels(data, 32, MEAN, STD).shape == (3, 32, 32)


def test_decompression_bomb_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # tiny file, 400 Mpixel
    with pytest.raises(ImageError, match="over the limit of 36000000 pixels"):
        decode_image(buffer.getvalue())
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # under PIL's own limit, over ours
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels, over the limit of 36000000"):
        decode_image(buffer.getvalue())


def sixteen_bit_png(samples: np.ndarray, icc_profile: bytes | None = None) -> bytes:
    """A 16-bit PNG of (h, w) grey or (h, w, 3|4) RGB/RGBA samples, written by hand (Pillow writes 16-bit grey only)."""
    import struct
    import zlib
    height, width = samples.shape[:2]
    colour_type = {1: 0, 3: 2, 4: 6}[1 if samples.ndim == 2 else samples.shape[2]]
    rows = samples.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    icc = chunk(b"iCCP", b"display\0\0" + zlib.compress(icc_profile)) if icc_profile else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + icc + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def tiled(shape: tuple[int, ...], seed: int = 0, high: int = 256, dtype=np.uint8) -> np.ndarray:
    """Samples of `shape` (rows, columns, bands...): a 64x64 tile of noise repeated, quick to encode and
    decoded pixel by pixel like any picture."""
    tile = np.random.default_rng(seed).integers(0, high, (64, 64, *shape[2:]), dtype=dtype)
    reps = (shape[0] // 64 + 1, shape[1] // 64 + 1) + (1,) * (len(shape) - 2)
    return np.tile(tile, reps)[:shape[0], :shape[1]]


def smooth(shape: tuple[int, ...]) -> np.ndarray:
    """8-bit samples of `shape` (rows, columns, bands): gradients, which HEIF and AVIF encode quickly."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    bands = [(x * (b + 1) + y * (3 - b)) % 256 for b in range(shape[2])]
    return np.stack(bands, axis=2).astype(np.uint8)


def heif_ten_bit(side: int) -> bytes:
    """A 10-bit RGB HEIF (pillow-heif writes 16-bit input as 10 bits; reading gives 8-bit RGB)."""
    samples = smooth((side, side, 3)).astype(np.uint16) << 8
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(side, side), data=samples.tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=30)
    return buffer.getvalue()


# The worst accepted image of each kind: the most bytes a pixel (as decoded or as stored), alpha and an
# ICC profile (composited and colour-managed whole), every frame of an animation. Each builder takes a
# side and returns the file's bytes; smooth content for HEIF and AVIF, whose encoders are slow on noise.
WORST_IMAGES = {
    "PNG 16-bit RGBA + ICC": lambda n: sixteen_bit_png(tiled((n, n, 4), high=65536, dtype=np.uint16),
                                                       display_profile()),
    "PNG 16-bit RGB": lambda n: sixteen_bit_png(tiled((n, n, 3), high=65536, dtype=np.uint16)),
    "PNG 16-bit grey": lambda n: sixteen_bit_png(tiled((n, n), high=65536, dtype=np.uint16)),
    "PNG RGBA + ICC": lambda n: image_bytes(Image.fromarray(tiled((n, n, 4)), "RGBA"), "PNG", compress_level=1,
                                            icc_profile=display_profile()),
    "PNG LA": lambda n: image_bytes(Image.fromarray(tiled((n, n, 2)), "LA"), "PNG", compress_level=1),
    "PNG palette + alpha": lambda n: encode(stored_image("P+alpha", (n, n), np.random.default_rng(0)), "PNG", 1),
    "APNG RGBA, 3 frames": lambda n: encode(Image.fromarray(tiled((n, n, 4)), "RGBA"), "PNG", 1,
                                            [Image.new("RGBA", (n, n))] * 2, compress_level=1),
    "JPEG CMYK": lambda n: image_bytes(Image.fromarray(tiled((n, n, 4)), "CMYK"), "JPEG"),
    "TIFF float": lambda n: image_bytes(Image.fromarray(tiled((n, n)).astype(np.float32) / 255, "F"), "TIFF",
                                        compression="tiff_adobe_deflate"),
    "TIFF CMYK": lambda n: image_bytes(Image.fromarray(tiled((n, n, 4)), "CMYK"), "TIFF",
                                             compression="tiff_adobe_deflate"),
    "TIFF RGBA, 2 pages": lambda n: image_bytes(Image.fromarray(tiled((n, n, 4)), "RGBA"), "TIFF", save_all=True,
                                                append_images=[Image.new("RGBA", (n, n))],
                                                compression="tiff_adobe_deflate"),
    "GIF, 3 frames": lambda n: image_bytes(Image.fromarray(tiled((n, n), high=255), "L").convert("P"), "GIF",
                                           save_all=True, append_images=[Image.new("P", (n, n))] * 2),
    "WebP RGBA + ICC, 2 frames": lambda n: image_bytes(Image.fromarray(tiled((n, n, 4)), "RGBA"), "WEBP",
                                                       lossless=True, method=0, icc_profile=display_profile(),
                                                       save_all=True, append_images=[Image.new("RGBA", (n, n))]),
    "BMP RGB": lambda n: image_bytes(Image.fromarray(tiled((n, n, 3))), "BMP"),
    "HEIF RGBA": lambda n: image_bytes(Image.fromarray(smooth((n, n, 4))), "HEIF", quality=30),
    "HEIF 10-bit": lambda n: heif_ten_bit(n),
    "AVIF RGBA": lambda n: image_bytes(Image.fromarray(smooth((n, n, 4))), "AVIF", speed=10, quality=30),
}

# What load_pixels may add to a process's peak RSS for an image of D decoded bytes (`decoded_bytes`, at
# most max_bytes): docs/captioning.md states this bound, per request and times decode_threads per batch.
DECODE_MEMORY_FACTOR = 4  # WebP's: libwebp's two frame buffers and Pillow's copy of the frame while it loads
DECODE_MEMORY_SLACK = 16 * 2**20  # code pages a first decode maps, allocator rounding, to_rgb's bands of rows
# max_bytes the worst images are built up to: 2 Mpixels at 4 bytes a pixel, or (to measure the default's
# worst case for docs/captioning.md) CLIPCAP_MEASURED_DECODE_BYTES=144000000.
MEASURED_LIMIT = int(os.environ.get("CLIPCAP_MEASURED_DECODE_BYTES", 8 * 2**20))

PEAK_DECODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import pillow_heif.HeifImagePlugin
    from clipcap.images import load_pixels

    def peak():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

    folder, limit, growth = sys.argv[1], int(sys.argv[2]), {}
    for kind in json.loads(sys.argv[3]):
        load_pixels(open(f"{folder}/{kind}.warm", "rb").read(), 224, [0.5] * 3, [0.5] * 3)  # its codec loaded
        data = open(f"{folder}/{kind}", "rb").read()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM) to the current RSS
        before = peak()
        load_pixels(data, 224, [0.5] * 3, [0.5] * 3, max_pixels=10**9, max_bytes=limit)
        growth[kind] = peak() - before
        del data
    print(json.dumps(growth))
""")


@pytest.fixture(scope="module")
def worst_image_peaks(tmp_path_factory) -> dict[str, tuple[int, int]]:
    """kind -> (decoded bytes, peak RSS growth of load_pixels) of the largest image of each kind within
    MEASURED_LIMIT, all measured one after another in one fresh process. Large buffers are mapped and
    unmapped on their own (MALLOC_MMAP_THRESHOLD_), so one decode's freed memory never hides the next's."""
    folder = tmp_path_factory.mktemp("worst")
    sizes = {}
    for kind, build in WORST_IMAGES.items():
        per_pixel = decoded_bytes(open_image(build(64))) / 64 ** 2
        side = math.isqrt(int(MEASURED_LIMIT / per_pixel))
        data = build(side)
        sizes[kind] = decoded_bytes(open_image(data, max_pixels=side ** 2))
        assert sizes[kind] <= MEASURED_LIMIT < (side + 1) ** 2 * per_pixel, kind
        (folder / kind).write_bytes(data)
        (folder / f"{kind}.warm").write_bytes(build(16))
    root = Path(__file__).resolve().parent.parent  # this checkout's clipcap, whatever is installed
    result = subprocess.run([sys.executable, "-c", PEAK_DECODE_SCRIPT, str(folder), str(MEASURED_LIMIT),
                             json.dumps(list(WORST_IMAGES))], cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": str(2**17)})
    assert result.returncode == 0, result.stderr
    return {kind: (sizes[kind], growth) for kind, growth in json.loads(result.stdout).items()}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("kind", sorted(WORST_IMAGES))
def test_the_worst_accepted_image_of_each_kind_decodes_within_the_stated_memory_bound(kind, worst_image_peaks):
    """The largest image of each kind within max_bytes adds at most DECODE_MEMORY_FACTOR x its decoded bytes
    + DECODE_MEMORY_SLACK to the peak RSS of a process decoding it."""
    size, growth = worst_image_peaks[kind]
    print(f"\n{kind}: {size / 2**20:.1f} MiB decoded, peak RSS +{growth / 2**20:.1f} MiB")
    assert growth <= DECODE_MEMORY_FACTOR * size + DECODE_MEMORY_SLACK


@pytest.mark.parametrize("kind", ["PNG 16-bit RGBA + ICC", "PNG 16-bit grey", "TIFF float", "HEIF 10-bit",
                                  "GIF, 3 frames"])
def test_an_image_over_the_decoded_bytes_limit_is_refused_before_decoding(kind, monkeypatch):
    data = WORST_IMAGES[kind](40)
    size = decoded_bytes(open_image(data))
    decode = monkeypatch.setattr  # any decode past the check would fail the test
    decode(Image.Image, "load", lambda self: pytest.fail("decoded an image over the limit"))
    with pytest.raises(ImageError, match=f"{size} bytes decoded, over the limit of {size - 1} decoded bytes"):
        load_pixels(data, 224, MEAN, STD, max_bytes=size - 1)


# -- preprocessing ---------------------------------------------------------------------------------

def test_preprocess_shape_and_normalisation():
    white = Image.new("RGB", (64, 40), (255, 255, 255))
    pixels = preprocess([white], 32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32  # a numpy array: no torch needed
    assert np.allclose(pixels, 2.0, atol=1e-3)  # (1 - 0.5) / 0.25


def resize_then_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """The previous preprocessing (whole image resized, then cropped), as 8-bit RGB."""
    width, height = image.size
    scale = image_size / min(width, height)
    resized = image.resize((max(image_size, round(width * scale)), max(image_size, round(height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - image_size) // 2, (resized.height - image_size) // 2
    return np.asarray(resized.crop((left, top, left + image_size, top + image_size)), dtype=np.float32)


@PROPERTY
@given(st.integers(1, 400), st.integers(1, 400), st.sampled_from([32, 224]), st.integers(0, 2**32 - 1))
def test_crop_first_matches_resize_then_crop(width, height, image_size, seed):
    """Within 2 of 255 levels on all but 1% of samples, and within half a level on average: Pillow takes
    the resample box in float32, which may move each of its two passes' rounding by one level, and it
    picks the order of the passes by the sizes, so on the smaller cut-out it may run them in the other
    order; where the first pass clips bicubic overshoot that moves a sample by a few levels (measured
    over 300 examples: at most 4 levels, on at most 0.3% of an example's samples)."""
    if max(width, height) / min(width, height) > 20:
        width = min(width, 20 * height)
        height = min(height, 20 * width)
    image = random_images(1, seed % 1000, 1)[0].resize((width, height))  # smooth colour ...
    noise = np.random.default_rng(seed).integers(-20, 21, (height, width, 3))  # ... with grain
    image = Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8))
    got = preprocess_image(image, image_size, [0, 0, 0], [1, 1, 1]).transpose(1, 2, 0) * 255
    difference = np.abs(got - resize_then_crop(image, image_size))
    assert (difference > 2 + 1e-3).mean() <= 0.01 and difference.mean() <= 0.5


@PROPERTY
@given(SIZES, st.integers(1, 8), st.sampled_from([32, 224]), st.sampled_from(["RGB", "L", "CMYK"]),
       st.integers(0, 2**32 - 1))
def test_preprocessing_as_stored_with_an_orientation_equals_preprocessing_upright(size, orientation, image_size,
                                                                                  mode, seed):
    """preprocess_image of the stored pixels with their EXIF orientation (what load_pixels does, turning
    only the cut-out upright) gives exactly the input of the upright picture (the EXIF table above)."""
    stored = stored_image(mode, size, np.random.default_rng(seed))
    upright = Image.fromarray(np.ascontiguousarray(oriented(np.asarray(stored), orientation)), mode)
    assert np.array_equal(preprocess_image(stored, image_size, MEAN, STD, orientation=orientation),
                       preprocess_image(upright, image_size, MEAN, STD))


def test_extreme_strip_gets_the_caption_of_its_centre():
    """The documented rule: an extreme aspect ratio is not refused; its centre square is what counts."""
    strip = np.zeros((4, 200_000, 3), np.uint8)  # black, white only around the centre
    strip[:, 100_000 - 12: 100_000 + 12] = 255
    decoded = decode_image(png_bytes(Image.fromarray(strip)))
    pixels = preprocess_image(decoded, 32, [0.5] * 3, [0.5] * 3)
    assert np.allclose(pixels, np.ones_like(pixels))


PEAK_SCRIPT = textwrap.dedent("""
    import gc, sys
    from PIL import Image
    from clipcap.images import preprocess_image
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    width, height, size = map(int, sys.argv[1:4])
    strip = Image.effect_noise((width, height), 64).convert("RGB")
    preprocess_image(Image.new("RGB", (40, 30)), size, [0.5] * 3, [0.5] * 3)  # load code pages first
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    preprocess_image(strip, size, [0.5] * 3, [0.5] * 3)
    print(status("VmHWM") - before)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_preprocessing_memory_is_bounded_on_an_extreme_strip():
    """Measured peak RSS growth of preprocessing a 200,000x3 strip against the docstring's bound.

    Resizing it whole made a 2,133,333x32 intermediate (273 MB); the bound here is ~0.5 MB.
    """
    width, height, size = 200_000, 3, 32
    side = min(width, height)
    margin = 2 * max(1, side / size) + 2
    bound = 4 * ((side + 2 * margin) ** 2 + size * (side + 2 * margin)) + 8 * 4 * 3 * size ** 2
    allocator_slack = 4 * 2 ** 20  # page granularity and malloc arenas; far below the old 273 MB
    root = Path(__file__).resolve().parent.parent  # this checkout's clipcap, whatever is installed
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(width), str(height), str(size)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.strip())
    print(f"\npeak RSS growth while preprocessing a {width}x{height} strip: {growth / 2**10:.0f} KiB "
          f"(bound {bound / 2**10:.0f} KiB + {allocator_slack / 2**20:.0f} MiB slack)")
    assert growth <= bound + allocator_slack


# -- shrink on load, colour management, CMYK, the formats setting ---------------------------------

def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.integers(230, 2000), st.integers(230, 2000), st.integers(1, 8))
def test_shrink_on_load_stays_within_a_gray_level_of_the_full_decode(seed, width, height, orientation):
    """JPEG DCT scaling to the smallest scale whose shorter side is >= the input size (224, ViT-B-32's):
    the decode is that small, and the model input differs from the full decode's by at most 1 gray level
    on average on photo-like pictures (the target). photo_like's finest detail spans 1/24 of the
    picture, ~9 input pixels at 224; detail near the input's own Nyquist limit differs more (DCT scaling
    averages 8x8 blocks where bicubic weighs a wider window): ~8 levels at a 32 px input."""
    image_size = 224
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = jpeg_bytes(photo_like(width, height, seed), exif=exif.tobytes())
    least = image_size
    shrunk = decode_as_stored(open_image(data), shrink_to=least).image
    scale = next((s for s in (8, 4, 2) if min(width // least, height // least) >= s), 1)
    assert sorted(shrunk.size) == sorted((-(-width // scale), -(-height // scale)))
    assert min(shrunk.size) >= min(least, width, height)
    fast = load_pixels(data, image_size, [0, 0, 0], [1, 1, 1])
    full = preprocess_image(decode_image(data), image_size, [0, 0, 0], [1, 1, 1])
    assert float(np.abs(fast - full).mean()) * 255 <= 1.0


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1's transfer function, linear 0..1 -> 8-bit."""
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return np.rint(255 * encoded)


# lcms's sRGB colorants (D65 primaries adapted to D50), red and blue swapped: a profile whose red is sRGB's blue.
SWAPPED = ((0.1431, 0.0606, 0.7141), (0.3851, 0.7169, 0.0971), (0.4361, 0.2225, 0.0139))
GAMMA = 563 / 256  # 2.2 as the profile stores it (u8Fixed8)


@PROPERTY
@given(st.sampled_from([(fmt, "RGB") for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "AVIF", "HEIF")]
                       + [(fmt, "L") for fmt in ("PNG", "JPEG", "TIFF")]),  # the formats that store grayscale
       st.integers(0, 2**16), st.integers(2, 40), st.integers(2, 40))
def test_embedded_icc_profiles_become_srgb(case, seed, width, height):
    """Expected from the profile's definition, not from LittleCMS: an RGB profile with sRGB's colorants
    red/blue swapped and gamma 2.2 shows stored (r, g, b) as sRGB (b', g', r'); a gamma-2.2 gray profile
    a gray of that luminance. Within 2 levels: LittleCMS's 16-bit pipeline and fixed-point colorants,
    on transfers whose slope stays near 1 (gamma 2.2 against sRGB's curve)."""
    fmt, mode = case
    rng = np.random.default_rng(seed)
    stored = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    profile = display_profile(SWAPPED, GAMMA) if mode == "RGB" else gray_profile(GAMMA)
    options = {"lossless": True} if fmt == "WEBP" else {}
    buffer = io.BytesIO()
    stored.save(buffer, format=fmt, icc_profile=profile, **options)
    data = buffer.getvalue()
    raw = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 255  # what the file stores
    if mode == "RGB":
        expected = srgb_encode(np.power(raw, GAMMA))[..., ::-1]
    else:
        expected = np.repeat(srgb_encode(np.power(raw, GAMMA))[..., None], 3, axis=2)
    decoded = np.asarray(decode_image(data), dtype=np.float64)
    assert np.abs(decoded - expected).max() <= 2, fmt


@PROPERTY
@given(st.integers(0, 2**16), st.integers(300, 900), st.integers(300, 900))
def test_colour_management_after_resampling_stays_within_a_gray_level(seed, width, height):
    """RGB is resampled as stored, then made sRGB at the input size (docstring of preprocess_image): on a
    photo with a Display P3 profile, at most 1 gray level on average from converting first."""
    buffer = io.BytesIO()
    photo_like(width, height, seed).save(buffer, format="PNG", icc_profile=display_profile())
    data = buffer.getvalue()
    converted_first = preprocess_image(decode_image(data), 224, [0, 0, 0], [1, 1, 1])
    difference = np.abs(load_pixels(data, 224, [0, 0, 0], [1, 1, 1]) - converted_first) * 255
    assert float(difference.mean()) <= 1.0


def without_adobe_marker(jpeg: bytes) -> bytes:
    """The JPEG with its APP14 "Adobe" segment cut out (markers before the scan only)."""
    position, out = 2, bytearray(jpeg[:2])
    while jpeg[position] == 0xFF and jpeg[position + 1] != 0xDA:
        length = int.from_bytes(jpeg[position + 2: position + 4], "big")
        segment = jpeg[position: position + 2 + length]
        if not (jpeg[position + 1] == 0xEE and segment[4:9] == b"Adobe"):
            out += segment
        position += 2 + length
    return bytes(out + jpeg[position:])


@PROPERTY
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(1, 40))
def test_cmyk_jpegs_read_with_the_convention_their_marker_states(seed, width, height):
    """Adobe's APP14 marker means inverted ink (what Pillow and libjpeg write); without it the samples are
    plain ink, as viewers read them."""
    ink = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    adobe = jpeg_bytes(Image.fromarray(ink, "CMYK"))
    plain = without_adobe_marker(adobe)
    assert b"Adobe" in adobe and b"Adobe" not in plain
    for data, invert in ((adobe, False), (plain, True)):
        raw = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)  # Pillow: always Adobe-inverted
        stored = 255 - raw if invert else raw
        expected = np.rint((255 - stored[..., :3]) * (255 - stored[..., 3:]) / 255)
        assert np.array_equal(np.asarray(decode_image(data)), expected.astype(np.uint8))


def ycck_jpeg(ink: np.ndarray) -> bytes:
    """A YCCK JPEG (Adobe APP14 transform 2) of CMYK `ink` (h, w, 4), as Adobe writes one. libjpeg's YCCK
    stores the ink's C, M, Y as if they were R, G, B in YCbCr (JFIF's equations) and K as Adobe's inverted
    ink (255 - k); Pillow writes a CMYK image's samples inverted and marks them transform 0 (no
    conversion), so those samples are written through Pillow's CMYK encoder and the transform byte is
    set to 2 after. Quality 100, so that only rounding separates the file from the ink."""
    c, m, y, k = np.moveaxis(ink.astype(np.float64), -1, 0)
    samples = np.stack([0.299 * c + 0.587 * m + 0.114 * y, -0.168736 * c - 0.331264 * m + 0.5 * y + 128,
                        0.5 * c - 0.418688 * m - 0.081312 * y + 128, 255 - k], axis=-1)
    written = np.clip(np.rint(255 - samples), 0, 255).astype(np.uint8)  # Pillow inverts what it writes
    buffer = io.BytesIO()
    Image.fromarray(written, "CMYK").save(buffer, format="JPEG", quality=100)
    cmyk = buffer.getvalue()
    transform = cmyk.index(b"Adobe") + 11  # "Adobe", version, flags0, flags1 (2 bytes each), transform
    assert cmyk[transform] == 0
    return cmyk[:transform] + b"\x02" + cmyk[transform + 1:]


@PROPERTY
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(1, 40))
def test_ycck_jpegs_show_their_ink(seed, width, height):
    """A YCCK JPEG decodes to the picture of its ink, (255 - c)(255 - k) / 255 per channel, like its CMYK
    rendition: within 6 levels (measured: at most 4, under half a level on average on noise), the
    rounding of the stored YCbCr samples and of q100 quantization, which the inverse conversion scales
    by up to 1.772. load_pixels reads it as decode_image does."""
    ink = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    data = ycck_jpeg(ink)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == "CMYK" and stored.info["adobe_transform"] == 2  # libjpeg converts YCCK to CMYK
    ink = ink.astype(np.float64)
    expected = np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255)
    decoded = decode_image(data)
    difference = np.abs(np.asarray(decoded, dtype=np.float64) - expected)
    assert difference.max() <= 6 and difference.mean() <= 1.0
    assert np.array_equal(load_pixels(data, 32, MEAN, STD), preprocess_image(decoded, 32, MEAN, STD))


def test_the_formats_setting_narrows_what_is_read():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    mpo = encode(picture, "MPO", 1, [picture.rotate(90)])
    assert open_image(mpo).format == "MPO"
    assert np.array_equal(np.asarray(decode_image(mpo)), np.asarray(Image.open(io.BytesIO(mpo)).convert("RGB")))
    with pytest.raises(ImageError, match="format MPO not accepted .accepted: JPEG."):
        decode_image(mpo, formats=["JPEG"])
    with pytest.raises(ImageError, match="format PNG not accepted .accepted: JPEG, GIF."):
        load_pixels(png_bytes(picture), 32, MEAN, STD, formats=("jpeg", "gif"))
    assert check_formats(["heif", "Png"]) == ("HEIF", "PNG")
    assert set(DEFAULT_FORMATS) == set(FORMATS) >= {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF"}
    for bad in (["PSD"], ["EPS", "JPEG"], []):
        with pytest.raises(ValueError, match="unknown image format|at least one"):
            check_formats(bad)


def _record_parses(monkeypatch, plugins: list[str], calls: list[str]) -> None:
    """Each named Pillow plugin records its name in `calls` when Image.open asks it to parse a header."""
    for name in plugins:
        factory, accept = Image.OPEN[name]
        monkeypatch.setitem(Image.OPEN, name, (lambda *a, f=factory, n=name: calls.append(n) or f(*a), accept))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF"])
def test_a_refused_plugin_never_parses_the_bytes(fmt, monkeypatch):
    """The accepted set decides which Pillow plugins may read a header: bytes of a refused format are named
    by their signature alone, the refused plugin's parser never runs (decoders of formats a server does not
    accept are attack surface). With the format accepted, the same bytes do reach that parser."""
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    data = encode(picture, fmt, 1)
    calls = []
    _record_parses(monkeypatch, [FORMATS[fmt].opener], calls)
    others = [name for name, spec in FORMATS.items() if spec.opener != FORMATS[fmt].opener]
    with pytest.raises(ImageError, match="not accepted"):
        open_image(data, others)
    assert calls == []
    assert open_image(data, [fmt]).format == fmt and calls == [fmt]


@pytest.mark.parametrize("header", [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", b"8BPS\x00\x01" + bytes(40)])
def test_formats_outside_the_registry_are_never_parsed(header, monkeypatch):
    """EPS (Ghostscript) and PSD are no accepted format at all: their plugins never see the bytes."""
    Image.init()
    called = []
    _record_parses(monkeypatch, [name for name in Image.OPEN if name not in {f.opener for f in FORMATS.values()}],
                   called)
    with pytest.raises(ImageError):
        open_image(header)
    assert called == []


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_samples_round_to_eight_bits(mode):
    """v -> round(v / 257): 200 is 1 (not 0), 65535 white, and a value just past a step rounds up."""
    values = np.array([[0, 128, 129, 200, 257 * 100 + 128, 257 * 100 + 129, 65535]], dtype=np.int32)
    image = Image.fromarray(values.astype(np.uint16) if mode == "I;16" else values)
    assert image.mode == mode
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 0, 1, 1, 100, 101, 255]


def test_the_pixel_limit_is_inclusive():
    """An image of exactly max_pixels is read; one pixel more is refused, before decoding."""
    data = png_bytes(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert open_image(data, max_pixels=2000).size == (50, 40)
    assert decode_image(data, max_pixels=2000).size == (50, 40)
    with pytest.raises(ImageError, match="50x40 = 2000 pixels, over the limit of 1999 pixels"):
        open_image(data, max_pixels=1999)


# -- fuzzing every accepted format ---------------------------------------------------------------

def peak_rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


FUZZ_PIXELS = 1_000_000  # the fuzzed decodes' pixel limit
# What one fuzzed decode may add to the process's peak: the limit's pixels in the widest mode Pillow
# keeps (4 bytes) and the few copies to_rgb makes (RGBA as uint16 and its products), plus decoder state.
FUZZ_MEMORY = 16 * FUZZ_PIXELS * 4 + 64 * 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.timeout(300)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_images(), st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=12),
       st.data())
def test_fuzzed_files_of_every_format_raise_image_error_or_decode_in_bounded_memory(case, edits, data):
    """Mutated files of each accepted format (header, tags, offsets, pixel data; TIFF with its
    compressions, multi-frame files): ImageError or a picture, nothing else; the peak RSS grows by no
    more than FUZZ_MEMORY over the example (pytest-timeout catches a hang)."""
    fmt, _, _, encoded = case
    corrupted = bytearray(encoded)
    for position, value in edits:
        corrupted[position % len(corrupted)] = value
    if data.draw(st.booleans()):  # and sometimes cut short, or grown by a run of one byte
        corrupted = corrupted[:data.draw(st.integers(1, len(corrupted)))]
        corrupted += bytes([data.draw(st.integers(0, 255))]) * data.draw(st.integers(0, 4096))
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    before = peak_rss()
    try:
        assert load_pixels(bytes(corrupted), 32, MEAN, STD, max_pixels=FUZZ_PIXELS).shape == (3, 32, 32)
    except ImageError:
        pass
    assert peak_rss() - before <= FUZZ_MEMORY, fmt
