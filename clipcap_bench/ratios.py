"""The speed-up ratios the benchmark reports: one table, read by statistics, the history and the targets.

Each ratio is one `Ratio` entry: its stable key (the history's metric name and targets.toml's
name for it), its display name, and the two backends and the stage compared. Nothing else
declares a ratio; reports carry the key, so a renamed display name changes no metric or target.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    key: str  # short and stable: the history's metric names and the targets refer to it
    name: str  # what the report prints
    slower: str  # backend in the numerator: the ratio is how many times faster `faster` is
    faster: str
    stage: str  # which stage's p50 is compared


RATIOS = (
    Ratio("kv-cache-e2e", "KV cache vs no-cache (paper's decoding), end to end", "torch-nocache", "torch",
          "end_to_end"),
    Ratio("kv-cache-decode", "KV cache vs no-cache, decode only", "torch-nocache", "torch", "decode"),
    Ratio("ort-vs-torch-e2e", "onnxruntime fp32 vs torch eager, end to end", "torch", "onnxruntime", "end_to_end"),
    Ratio("ort-vs-torch-decode", "onnxruntime fp32 vs torch eager, decode only", "torch", "onnxruntime", "decode"),
    Ratio("int8-vs-fp32-decode", "int8 decoder vs fp32 decoder (onnxruntime), decode only", "onnxruntime",
          "onnxruntime-int8", "decode"),
    Ratio("int8-vs-fp32-e2e", "int8 decoder vs fp32 decoder (onnxruntime), end to end", "onnxruntime",
          "onnxruntime-int8", "end_to_end"),
    Ratio("trt-vs-ort-e2e", "TensorRT vs onnxruntime fp32, end to end", "onnxruntime", "tensorrt", "end_to_end"),
)
