"""Image decoding refuses bad input with clear errors; preprocessing matches CLIP's."""
import io

import numpy as np
import pytest
from PIL import Image

from clipcap.images import ImageError, decode_image, preprocess
from conftest import png_bytes, random_images


def test_decodes_png_jpeg_webp():
    image = random_images(1)[0]
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(png_bytes(image, fmt)).size == (48, 48)


def test_palette_and_alpha_become_rgb():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert decode_image(png_bytes(image)).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"this is not an image", "not a recognised image"),
    (png_bytes(random_images(1)[0])[:200], "corrupt or truncated"),
    (png_bytes(Image.new("RGB", (4, 4)), "GIF"), "format GIF not accepted"),
])
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # tiny file, 400 Mpixel
    with pytest.raises(ImageError, match="over the limit of 36000000 pixels"):
        decode_image(buffer.getvalue())
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # under PIL's own limit, over ours
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels, over the limit of 36000000"):
        decode_image(buffer.getvalue())


def test_preprocess_shape_and_normalisation():
    white = Image.new("RGB", (64, 40), (255, 255, 255))
    pixels = preprocess([white], 32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert pixels.shape == (1, 3, 32, 32)
    assert np.allclose(pixels.numpy(), 2.0, atol=1e-3)  # (1 - 0.5) / 0.25
