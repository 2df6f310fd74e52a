"""The OpenVINO int8 encoder: NNCF post-training quantisation of encoder.onnx into an OpenVINO IR (.xml + .bin).

Static int8 (activation scales fixed at build time, from calibration images), unlike onnxruntime's
dynamic int8 that measures each call's range. Calibration images are the user's (a directory,
preprocessed as the bundle's captioner does: they should look like what will be served); without
them, random noise images stand in, which a warning and the manifest's quantization entry say.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipcap.config import BundleError, ClipConfig
from clipcap.image_formats import extensions
from clipcap.images import load_pixels_file, preprocess
from clipcap.runtimes.base import RuntimeUnavailable
from clipcap.runtimes.openvino_encoder import INSTALL, import_openvino

RANDOM_CALIBRATION = ("random noise images (no calibration images given): activation ranges may not match real "
                      "images; rebuild with calibration images (--calibration-images DIR)")


@dataclass
class Calibration:
    """What NNCF calibrates on, read before anything is written."""

    samples: list  # (1, 3, S, S) float32 arrays, preprocessed as served
    note: dict  # how they were made: the manifest's quantization["calibration"]


def openvino_calibration(clip: ClipConfig, images: Path | None, count: int, seed: int = 0) -> Calibration:
    """Up to `count` images of the directory `images` (None: `count` random noise images, with a warning).
    BundleError for a directory without images, then RuntimeUnavailable (the install line) without OpenVINO or
    NNCF: both before any image is decoded."""
    files = None
    if images is not None:
        endings = extensions()
        files = [p for p in sorted(Path(images).rglob("*")) if p.suffix.lower() in endings][:count]
        if not files:
            raise BundleError(f"{images}: no calibration images there (a directory with {', '.join(endings)} files)")
    _tools()
    if files is None:
        warnings.warn(f"OpenVINO int8 encoder calibrated on {RANDOM_CALIBRATION}", stacklevel=2)
        rng = np.random.default_rng(seed)
        pictures = [Image.fromarray(rng.integers(0, 256, (clip.image_size, clip.image_size, 3), dtype=np.uint8))
                    for _ in range(count)]
        pixels = preprocess(pictures, clip.image_size, clip.mean, clip.std)
        return Calibration([row[None] for row in pixels],
                           {"source": "random", "images": count, "seed": seed, "note": RANDOM_CALIBRATION})
    samples = [load_pixels_file(f, clip.image_size, clip.mean, clip.std)[None] for f in files]
    return Calibration(samples, {"source": str(Path(images).resolve()), "images": len(samples)})


def quantize_encoder_openvino(source: Path, target: Path, calibration: Calibration, smooth_quant: bool = False) -> dict:
    """encoder.onnx at `source` -> an int8 IR at `target` (.xml; .bin beside it). Returns the manifest's
    quantization entry. Symmetric activations (NNCF's performance preset; its transformer default, mixed, makes
    some asymmetric): faster and closer to fp32 in the measurements. `smooth_quant`: NNCF's SmoothQuant (its
    default for transformers) moves activation range into the weights before calibrating; off by default:
    with it, inputs unlike the calibration images lost far more cosine (docs/decisions/openvino-encoder.md)."""
    ov, nncf = _tools()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.convert_model(str(source))
    alphas = AdvancedSmoothQuantParameters() if smooth_quant else AdvancedSmoothQuantParameters(matmul=-1)  # -1: off
    quantized = nncf.quantize(model, nncf.Dataset(calibration.samples), subset_size=len(calibration.samples),
                              model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
                              advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=alphas))
    ov.save_model(quantized, str(target), compress_to_fp16=False)  # the float parts stay fp32, as in the source
    return {"method": "nncf quantize (OpenVINO, static int8)", "weights": "int8", "activations": "int8",
            "model_type": "transformer", "preset": "performance", "smooth_quant": smooth_quant, "calibration": calibration.note,
            "versions": {"openvino": ov.__version__, "nncf": nncf.__version__}}


def _tools():
    ov = import_openvino("--encoder-method openvino-int8")
    try:
        import nncf
    except ImportError as error:
        raise RuntimeUnavailable(f"--encoder-method openvino-int8 needs NNCF ({error}); install it with: {INSTALL}") from None
    return ov, nncf
