"""The OpenVINO engine for an export bundle's encoder graph: an IR (.xml + .bin) that NNCF quantised to int8.

OnnxRuntime opens it for an encoder whose manifest entry says engine "openvino" (the mapper and the decoder
stay on onnxruntime) and calls it as it calls its own encoder graph: pixels in, the graph's outputs by name
out, as numpy arrays (the arrays onnxruntime's CPU sessions return). OpenVINO is optional (the `openvino` extra): without it, opening such a bundle
raises RuntimeUnavailable with the install line.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from clipcap.arrays import to_numpy
from clipcap.runtimes.base import RuntimeUnavailable

INSTALL = "pip install 'clipcap-deploy[openvino]'"
# Batch sizes compiled at their static shape beside the graph compiled for any batch: batch 1 ran 5-20% faster
# so (docs/decisions/openvino-encoder.md); each costs one more compiled copy of the graph.
STATIC_BATCHES = (1,)


def import_openvino(purpose: str):
    """The `openvino` module, or RuntimeUnavailable naming `purpose` and the install line."""
    try:
        import openvino
    except ImportError as error:
        raise RuntimeUnavailable(f"{purpose} needs OpenVINO, which is not installed here ({error}); "
                                 f"install it with: {INSTALL}") from None
    return openvino


class OpenVinoEncoder:
    """One encoder IR compiled for the CPU (for any batch, and for each of STATIC_BATCHES at its static shape);
    `__call__(pixels)` -> {output name: (B, ...) float32 array}."""

    def __init__(self, file: Path, outputs: list[str], device: Any, threads: int):
        ov = import_openvino(f"{file}: this bundle's encoder (engine openvino)")
        if device != "cpu":
            raise RuntimeUnavailable(f"{file}: the OpenVINO encoder runs on the CPU only, not {device}")
        # f32: a CPU with bf16 units would otherwise run the graph's float parts in bf16 (OpenVINO's default
        # there), moving the embeddings beyond what int8 alone does. One stream of `threads` threads, like
        # onnxruntime's session beside it.
        settings = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_PRECISION_HINT": "f32"}
        core = ov.Core()
        model = core.read_model(str(file))
        self.requests = {None: core.compile_model(model, "CPU", settings).create_infer_request()}  # any batch
        for batch in STATIC_BATCHES:
            static, shape = model.clone(), model.input("pixel_values").get_partial_shape()
            shape[0] = batch
            static.reshape({"pixel_values": shape})
            self.requests[batch] = core.compile_model(static, "CPU", settings).create_infer_request()
        self.outputs = outputs
        self.lock = threading.Lock()  # one request per shape, its output buffers reused: one call at a time

    def __call__(self, pixels: Any) -> dict[str, np.ndarray]:
        request = self.requests.get(pixels.shape[0], self.requests[None])
        with self.lock:
            request.infer({"pixel_values": np.ascontiguousarray(to_numpy(pixels), dtype=np.float32)})
            # Copies: the request's output buffers are overwritten by its next call.
            return {name: request.get_tensor(name).data.copy() for name in self.outputs}
