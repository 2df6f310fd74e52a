"""The accepted image formats, declared once: Pillow's name, the one plugin that may parse it, file extensions.

Torch- and Pillow-free, so the command line parses `--formats` and a folder walk picks files by
extension without loading the decoders (clipcap.images does the decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why."""


@dataclass(frozen=True)
class ImageFormat:
    """An accepted format: Pillow's name for it, the plugin that may parse it, what its decoder can do."""

    name: str  # Image.format of an opened file
    opener: str  # the only Pillow plugin Image.open may try for it (an MPO is found by the JPEG plugin)
    extensions: tuple[str, ...]  # file name endings (lower case) a folder walk reads as this format
    shrinks_on_load: bool = False  # the decoder scales by 1/2, 1/4, 1/8 on request (Image.draft)
    plugin_module: str | None = None  # imported to register the plugin with Pillow; None: Pillow's own


FORMATS = {fmt.name: fmt for fmt in (
    ImageFormat("JPEG", "JPEG", (".jpg", ".jpeg", ".jpe", ".jfif"), shrinks_on_load=True),
    ImageFormat("MPO", "JPEG", (".mpo",), shrinks_on_load=True),
    ImageFormat("PNG", "PNG", (".png", ".apng")),
    ImageFormat("WEBP", "WEBP", (".webp",)),
    ImageFormat("BMP", "BMP", (".bmp", ".dib")),
    ImageFormat("GIF", "GIF", (".gif",)),
    ImageFormat("TIFF", "TIFF", (".tif", ".tiff")),
    ImageFormat("AVIF", "AVIF", (".avif",)),
    ImageFormat("HEIF", "HEIF", (".heic", ".heif", ".hif"), plugin_module="pillow_heif.HeifImagePlugin"),
)}
DEFAULT_FORMATS = tuple(FORMATS)


def check_formats(names: Iterable[str]) -> tuple[str, ...]:
    """Format names as given, upper case; ValueError when one is not in FORMATS or none is given."""
    names = tuple(str(name).upper() for name in names)
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown image format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    if not names:
        raise ValueError(f"at least one image format must be accepted; known: {', '.join(FORMATS)}")
    return names


def extensions(formats: Iterable[str] = DEFAULT_FORMATS) -> tuple[str, ...]:
    """The file name endings of `formats` (checked), lower case."""
    return tuple(ext for name in check_formats(formats) for ext in FORMATS[name].extensions)
