"""Benchmark backends: what each name runs, on which bundle kind, and a runtime wrapper that times every call.

Nothing is forked for measuring: `Captioner` preprocesses, the runtime encodes and
`decoding.generate` decodes, exactly as in serving; `TimedRuntime` times each call the decoding
loop makes (the first call is the prefix step, every later one a token step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clipcap_bench.bundles import BUNDLE_HOW_TO, bundle_kind
from clipcap.config import BundleError


@dataclass(frozen=True)
class BenchBackend:
    runtime: str  # a name in clipcap.runtimes.RUNTIMES
    bundle_kind: str  # which of the given paths it opens (see `bundle_kind`)
    use_cache: bool = True  # False: the paper's decoding, the whole sequence recomputed every step
    what: str = ""  # one line for the reports


BACKENDS = {
    "torch": BenchBackend("torch", "model", what="PyTorch eager, KV cache (DynamicCache)"),
    "torch-nocache": BenchBackend("torch", "model", use_cache=False,
                                  what="PyTorch eager, no KV cache: the paper's decoding (baseline)"),
    "onnxruntime": BenchBackend("onnxruntime", "onnx-fp32", what="onnxruntime fp32, KV cache, IOBinding"),
    "onnxruntime-int8": BenchBackend("onnxruntime", "onnx-int8",
                                     what="onnxruntime, dynamic int8 decoder (fp32 encoder), KV cache"),
    "onnxruntime-int8-wo": BenchBackend("onnxruntime", "onnx-int8-wo",
                                        what="onnxruntime, weight-only int8 decoder (MatMulNBits), in-place KV cache"),
    "onnxruntime-int4-wo": BenchBackend("onnxruntime", "onnx-int4-wo",
                                        what="onnxruntime, weight-only int4 decoder (MatMulNBits), in-place KV cache"),
    "onnxruntime-fp16": BenchBackend("onnxruntime", "onnx-fp16",
                                     what="onnxruntime, fp16 decoder and encoder (fp32 I/O): the CUDA provider's sibling"),
    "tensorrt": BenchBackend("tensorrt", "tensorrt", what="TensorRT engines, KV cache on the GPU"),
}


class TimedRuntime:
    """A `Runtime` that records how long each encode and decoder step takes.

    On CUDA every timed call ends with a synchronize, so a time covers the work, not its launch.
    `steps_ms[0]` is the prefix step; `steps_ms[k]` the step that consumes generated token k.
    """

    def __init__(self, runtime):
        self.inner = runtime
        self.config = runtime.config
        self.device = runtime.device
        self.steps_ms: list[float] = []

    def _synchronize(self) -> None:
        if str(self.device).startswith("cuda"):  # numpy runtimes say "cpu"
            torch.cuda.synchronize(self.device)

    def _timed(self, call: Callable, *args) -> tuple[Any, float]:
        start = time.perf_counter()
        result = call(*args)
        self._synchronize()
        return result, (time.perf_counter() - start) * 1e3

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._timed(self.inner.encode, pixels)[0]

    def map_embeddings(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self.inner.map_embeddings(clip_embeddings)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(token_ids)

    def reset(self) -> None:
        """Forget the recorded steps: call before each caption batch (not in new_cache, which the
        no-cache wrapper calls at every step)."""
        self.steps_ms = []

    def new_cache(self, batch_size: int):
        return self.inner.new_cache(batch_size)

    def step(self, embeds: torch.Tensor, cache):
        result, milliseconds = self._timed(self.inner.step, embeds, cache)
        self.steps_ms.append(milliseconds)
        return result

    def select(self, cache, index: torch.Tensor):
        return self.inner.select(cache, index)


def _missing_hardware(backend: BenchBackend, device: str) -> str | None:
    """Why TensorRT cannot run here (package, device), said before asking for a bundle it could not use."""
    from clipcap.runtimes import RuntimeUnavailable

    if backend.runtime != "tensorrt":
        return None
    from clipcap.runtimes.tensorrt_runtime import import_tensorrt

    try:
        import_tensorrt()
    except RuntimeUnavailable as error:
        return str(error)
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return f"TensorRT runs on a CUDA GPU: pass --device cuda on a machine with one (this run: {device})"
    return None


@dataclass
class OpenBackend:
    name: str
    path: Path
    captioner: Any  # clipcap.captioner.Captioner over a TimedRuntime
    timed: TimedRuntime
    use_cache: bool


def open_backends(names: list[str], paths: list[Path], device: str) -> tuple[dict[str, OpenBackend], dict[str, str]]:
    """Open each named backend on the path of the bundle kind it needs.

    Returns (open backends, {name: why it is unavailable}); an unavailable backend never stops the others.
    Backends sharing a runtime and a bundle (torch, torch-nocache) share one loaded model.
    """
    from clipcap.formats.model_bundle import load_tokenizer
    from clipcap.captioner import Captioner
    from clipcap.runtimes import RuntimeUnavailable, open_runtime

    by_kind: dict[str, Path] = {}
    for path in map(Path, paths):
        kind = bundle_kind(path)
        if kind is None:
            raise BundleError(f"{path}: neither a model bundle nor an export (ONNX, int8, TensorRT) bundle")
        by_kind.setdefault(kind, path)
    opened, unavailable, runtimes = {}, {}, {}
    for name in names:
        if name not in BACKENDS:
            raise BundleError(f"unknown benchmark backend {name!r}; known: {', '.join(BACKENDS)}")
        backend = BACKENDS[name]
        path = by_kind.get(backend.bundle_kind)
        missing = _missing_hardware(backend, device)
        if missing:
            unavailable[name] = missing
            continue
        if path is None:
            how_to = BUNDLE_HOW_TO[backend.bundle_kind]
            unavailable[name] = f"no {backend.bundle_kind} bundle among the paths given; make one: {how_to}"
            continue
        key = (backend.runtime, path)
        try:
            if key not in runtimes:
                runtimes[key] = TimedRuntime(open_runtime(path, backend.runtime, device))
        except (RuntimeUnavailable, ImportError) as error:
            unavailable[name] = str(error)
            continue
        timed = runtimes[key]
        captioner = Captioner(timed, load_tokenizer(path, timed.config), timed.config)
        opened[name] = OpenBackend(name, path, captioner, timed, backend.use_cache)
    return opened, unavailable
