"""Backends behind the `Runtime` protocol, by name; each imports its heavy dependency lazily."""
from __future__ import annotations

import importlib
from pathlib import Path

from clipcap.runtimes.base import Runtime

# name -> "module:class"; the class has `from_path(path, device)`.
RUNTIMES = {
    "torch": "clipcap.runtimes.torch_runtime:TorchRuntime",
    "onnxruntime": "clipcap.runtimes.onnx_runtime:OnnxRuntime",
    "tensorrt": "clipcap.runtimes.tensorrt_runtime:TensorRTRuntime",
}


class RuntimeUnavailable(RuntimeError):
    """The backend cannot run here (package or device missing); the message says what to install."""


def open_runtime(path: str | Path, backend: str = "torch", device: str = "cpu") -> Runtime:
    if backend not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown backend {backend!r}; known: {', '.join(RUNTIMES)}")
    module_name, class_name = RUNTIMES[backend].split(":")
    runtime_class = getattr(importlib.import_module(module_name), class_name)
    return runtime_class.from_path(Path(path), device)


__all__ = ["RUNTIMES", "Runtime", "RuntimeUnavailable", "open_runtime"]
