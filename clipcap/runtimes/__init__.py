"""Backends behind the `Runtime` protocol, by name; each imports its heavy dependency lazily.

`open_runtime(path)` picks the backend from the bundle's kind (clipcap.formats.detect); a named
backend overrides it.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap.runtimes.base import Runtime, RuntimeUnavailable, compute_threads, set_compute_threads

if TYPE_CHECKING:
    from clipcap.config import ClipCapConfig

# name -> "module:class"; the class has `from_path(path, device, config=None)`.
RUNTIMES = {
    "torch": "clipcap.runtimes.torch_runtime:TorchRuntime",
    "torch-bf16": "clipcap.runtimes.torch_runtime:TorchBf16Runtime",  # a model bundle, CLIP's tower in bfloat16
    "onnxruntime": "clipcap.runtimes.onnx_runtime:OnnxRuntime",
    "tensorrt": "clipcap.runtimes.tensorrt_runtime:TensorRTRuntime",
}

# name -> the extra that installs what it needs beyond the core install (onnxruntime is in the core).
EXTRAS = {"torch": "torch", "torch-bf16": "torch", "tensorrt": "tensorrt"}


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
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # the core install has onnxruntime only
        install = f"clipcap-deploy[{EXTRAS[backend]}]" if backend in EXTRAS else "clipcap-deploy"
        raise RuntimeUnavailable(f"backend {backend!r} needs {error.name or error}, not installed here: "
                                 f"pip install '{install}'") from None
    runtime_class = getattr(module, class_name)
    return runtime_class.from_path(Path(path), device, config=config)


__all__ = ["EXTRAS", "RUNTIMES", "Runtime", "RuntimeUnavailable", "compute_threads", "open_runtime", "set_compute_threads"]
