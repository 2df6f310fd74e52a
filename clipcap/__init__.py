"""clipcap: ClipCap image captioning for deployment — model, bundles, decoding and runtimes.

Every module, these names included, is imported on use, so `import clipcap` (and a light module such
as clipcap.serving.http_limits, which Ray Serve's HTTP proxy imports) does not load torch or Pillow.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {"BundleError": "clipcap.config", "ClipCapConfig": "clipcap.config",
            "DecodingError": "clipcap.decoding_options", "DecodingOptions": "clipcap.decoding_options",
            "ImageError": "clipcap.image_formats"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipcap' has no attribute {name!r}")


def load_bundle(path):
    from clipcap.formats.model_bundle import load_bundle as _load

    return _load(path)


def save_bundle(model, tokenizer, path):
    from clipcap.formats.model_bundle import save_bundle as _save

    return _save(model, tokenizer, path)


__all__ = ["BundleError", "ClipCapConfig", "DecodingError", "DecodingOptions", "ImageError", "load_bundle",
           "save_bundle"]
