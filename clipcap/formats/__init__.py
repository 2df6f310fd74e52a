"""On-disk formats: the model bundle, the export bundle (manifest, graph specs, token table) and
TensorRT profiles, with `detect(path)` telling the kinds of bundle apart.

Readers and writers only: nothing here builds a graph or an engine (no torch.onnx, no tensorrt).
"""
from clipcap.formats.detect import KINDS, BundleKind, detect

__all__ = ["KINDS", "BundleKind", "detect"]
