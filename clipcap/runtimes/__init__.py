"""Backends behind the `Runtime` protocol, by name; each imports its heavy dependency lazily.

`open_runtime(path)` picks the backend from the bundle's kind (clipcap.formats.detect); a named
backend overrides it.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap.runtimes.base import Runtime, RuntimeUnavailable

if TYPE_CHECKING:
    from clipcap.config import ClipCapConfig

# name -> "module:class"; the class has `from_path(path, device, config=None)`.
RUNTIMES = {
    "torch": "clipcap.runtimes.torch_runtime:TorchRuntime",
    "torch-bf16": "clipcap.runtimes.torch_runtime:TorchBf16Runtime",  # a model bundle, CLIP's tower in bfloat16
    "onnxruntime": "clipcap.runtimes.onnx_runtime:OnnxRuntime",
    "tensorrt": "clipcap.runtimes.tensorrt_runtime:TensorRTRuntime",
}


def open_runtime(path: str | Path, backend: str | None = None, device: str = "cpu",
                 config: ClipCapConfig | None = None) -> Runtime:
    """The bundle at `path` behind `backend` (None: the one its kind needs). `config`: the bundle's
    clipcap.json when the caller has read it already (None: read here)."""
    from clipcap.formats.detect import detect  # torch: not imported by the command line's parser

    if backend is None:
        backend = detect(path).backend
    if backend not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown backend {backend!r}; known: {', '.join(RUNTIMES)}")
    module_name, class_name = RUNTIMES[backend].split(":")
    runtime_class = getattr(importlib.import_module(module_name), class_name)
    return runtime_class.from_path(Path(path), device, config=config)


__all__ = ["RUNTIMES", "Runtime", "RuntimeUnavailable", "open_runtime"]
