"""clipcap: ClipCap image captioning for deployment — model, bundles, decoding and runtimes.

Heavy modules (torch, open_clip, transformers) are imported on use, so `import clipcap` stays cheap.
"""
from clipcap.config import BundleError, ClipCapConfig
from clipcap.decoding_options import DecodingError, DecodingOptions
from clipcap.image_formats import ImageError

__version__ = "0.1.0"


def load_bundle(path):
    from clipcap.formats.model_bundle import load_bundle as _load

    return _load(path)


def save_bundle(model, tokenizer, path):
    from clipcap.formats.model_bundle import save_bundle as _save

    return _save(model, tokenizer, path)


__all__ = ["BundleError", "ClipCapConfig", "DecodingError", "DecodingOptions", "ImageError", "load_bundle",
           "save_bundle"]
