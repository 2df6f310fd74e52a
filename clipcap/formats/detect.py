"""Which kind of bundle a directory holds, told by the files each kind alone has (nothing is parsed).

Every kind carries `clipcap.json` and the tokenizer; the kind decides the runtime that opens it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipcap.config import CONFIG_FILE, BundleError
from clipcap.formats.export_bundle import MANIFEST_FILE, fp16_graph_file, int8_graph_file, weight_only_graph_file
from clipcap.formats.model_bundle import WEIGHTS_FILE
from clipcap.formats.tensorrt_profiles import PROFILES_FILE


@dataclass(frozen=True)
class BundleKind:
    name: str  # model | onnx-fp32 | onnx-int8 | onnx-int8-wo | onnx-int4-wo | onnx-fp16 | tensorrt
    marker: str  # the file only this kind has (checked in KINDS order)
    backend: str  # the runtime that opens it (a name in clipcap.runtimes.RUNTIMES)
    how_to_build: str  # the command that makes one


# Most specific first: a quantised sibling also has export.json, every kind has clipcap.json.
KINDS = (
    BundleKind("tensorrt", PROFILES_FILE, "tensorrt",
               "python export/to_tensorrt.py MODEL_BUNDLE_OR_FP32_EXPORT --out DIR (tensorrt + CUDA GPU)"),
    BundleKind("onnx-int8", int8_graph_file("decoder.onnx"), "onnxruntime",
               "python export/quantize.py FP32_EXPORT_DIR"),
    BundleKind("onnx-int8-wo", weight_only_graph_file("decoder.onnx", "int8-wo"), "onnxruntime",
               "python export/quantize.py FP32_EXPORT_DIR --method int8-wo"),
    BundleKind("onnx-int4-wo", weight_only_graph_file("decoder.onnx", "int4-wo"), "onnxruntime",
               "python export/quantize.py FP32_EXPORT_DIR --method int4-wo"),
    BundleKind("onnx-fp16", fp16_graph_file("decoder.onnx"), "onnxruntime",
               "python export/quantize.py FP32_EXPORT_DIR --method fp16 (for onnxruntime's CUDA provider)"),
    BundleKind("onnx-fp32", MANIFEST_FILE, "onnxruntime", "python export/to_onnx.py MODEL_BUNDLE --out DIR"),
    BundleKind("model", WEIGHTS_FILE, "torch",
               "python training/train.py ... --out DIR, or clipcap import-original CKPT.pt --out DIR"),
)


def detect(path: str | Path) -> BundleKind:
    """The kind of bundle in `path`, or BundleError naming the files looked for and how to make each kind."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    for kind in KINDS:
        if (path / kind.marker).is_file():
            return kind
    found = "has" if (path / CONFIG_FILE).is_file() else f"has no {CONFIG_FILE} and"
    raise BundleError(f"{path}: not a bundle: it {found} none of {', '.join(k.marker for k in KINDS)}. Make one: "
                      + "; ".join(f"{k.name}: {k.how_to_build}" for k in KINDS))
