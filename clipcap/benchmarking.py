"""Benchmark harness: per-stage latency of every backend side by side, load tests, roofline arithmetic.

Nothing is forked for measuring: `Captioner` preprocesses, the runtime encodes and
`decoding.generate` decodes, exactly as in serving; a `TimedRuntime` wrapper times each call the
decoding loop makes (the first call is the prefix step, every later one a token step). Backends
run interleaved, round-robin per iteration, so a busy neighbour slows all of them alike, and every
claim is a ratio of two numbers from the same run. Generation is fixed length (the stop token is
ignored), so every backend generates exactly the same number of tokens.

Results are plain dicts (JSON-ready; `check_report` states their schema), rendered to Markdown and
PNG here; the scripts in benchmarks/ only parse arguments and call these functions.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

from clipcap.config import BundleError, ClipCapConfig, GPT2Config

LATENCY_SCHEMA = "clipcap-latency/1"
SERVING_SCHEMA = "clipcap-serving/1"
PERCENTILES = (50, 90, 99)
FIXED_LENGTH_NOTE = ("fixed-length greedy generation: the stop token is ignored, so every backend generates "
                     "exactly `tokens` tokens per image and does identical work")

# ---------------------------------------------------------------------------------------------
# Backends: what each benchmark name runs, and which bundle it needs.


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
    "tensorrt": BenchBackend("tensorrt", "tensorrt", what="TensorRT engines, KV cache on the GPU"),
}
BUNDLE_HOW_TO = {
    "model": "a model bundle (clipcap.json + model.safetensors); build one with --make-full-size DIR",
    "onnx-fp32": "an fp32 export bundle: python export/to_onnx.py MODEL_BUNDLE --out DIR",
    "onnx-int8": "an int8 export bundle: python export/quantize.py FP32_EXPORT_DIR",
    "tensorrt": "a TensorRT bundle: python export/to_tensorrt.py FP32_EXPORT_DIR --out DIR (CUDA GPU)",
}


def bundle_kind(path: Path) -> str | None:
    """model | onnx-fp32 | onnx-int8 | tensorrt, read from the files in `path`; None if none fits."""
    from clipcap.formats.model_bundle import WEIGHTS_FILE
    from clipcap.formats.export_bundle import INT8_PRECISION, MANIFEST_FILE
    from clipcap.formats.tensorrt_profiles import PROFILES_FILE

    if (path / PROFILES_FILE).is_file():
        return "tensorrt"
    if (path / MANIFEST_FILE).is_file():
        try:
            precision = json.loads((path / MANIFEST_FILE).read_text()).get("precision")
        except (ValueError, AttributeError):
            return None
        return {"fp32": "onnx-fp32", INT8_PRECISION: "onnx-int8"}.get(precision)
    if (path / WEIGHTS_FILE).is_file():
        return "model"
    return None


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
        if self.device.type == "cuda":
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
            unavailable[name] = f"no {backend.bundle_kind} bundle among the paths given; pass {how_to}"
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


# ---------------------------------------------------------------------------------------------
# The latency run.


@dataclass
class LatencyConfig:
    paths: list[Path]  # model bundle and/or export bundles; each backend takes the kind it needs
    backends: list[str] = field(default_factory=lambda: ["torch", "torch-nocache", "onnxruntime",
                                                         "onnxruntime-int8", "tensorrt"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    tokens: list[int] = field(default_factory=lambda: [20, 67])  # 67: the paper's entry_length
    device: str = "cpu"  # cpu | cuda[:N]
    warmup: int = 1  # iterations per backend and cell, run and thrown away
    iters: int = 5  # measured iterations per backend and cell
    time_budget_s: float | None = None  # a backend stops early in a cell once its measured time passes this
    min_iters: int = 2  # ... but never before this many measured iterations
    threads: int = 1  # torch.set_num_threads; onnxruntime sessions follow it (intra-op threads)
    image_size: tuple[int, int] = (640, 480)  # synthetic input images (width, height): a typical photo
    seed: int = 0

    def validate(self) -> "LatencyConfig":
        for name, values in (("batch sizes", self.batch_sizes), ("tokens", self.tokens)):
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values}")
        if self.warmup < 0 or self.iters < 1 or self.min_iters < 1 or self.threads < 1:
            raise ValueError("warmup must be >= 0; iters, min_iters and threads >= 1")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
        return self


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Noisy RGB images: preprocessing cost depends on the pixel count, not on the content."""
    rng = np.random.default_rng(seed)
    width, height = size
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def measure_once(backend: OpenBackend, images: list[Image.Image], tokens: int) -> dict:
    """Caption `images` once, exactly `tokens` tokens each; every stage's time in ms."""
    from clipcap.decoding import DecodingOptions

    options = DecodingOptions(max_tokens=tokens, ignore_stop=True, use_cache=backend.use_cache)
    backend.timed.reset()
    start = time.perf_counter()
    batch = backend.captioner.caption_images(images, options)
    end_to_end = (time.perf_counter() - start) * 1e3
    steps = backend.timed.steps_ms
    if len(steps) != tokens or any(len(c.token_ids) != tokens for c in batch.captions):
        raise RuntimeError(f"{backend.name}: expected {tokens} decoder steps and tokens per caption, got "
                           f"{len(steps)} steps")
    return {"end_to_end": end_to_end, **batch.timings_ms, "first_step": steps[0], "token_steps": steps[1:]}


def run_latency(config: LatencyConfig, progress: bool = True) -> dict:
    """The whole measurement; returns the report (see `check_report`)."""
    from tqdm import tqdm

    config.validate()
    torch.set_num_threads(config.threads)
    load_before = os.getloadavg()
    opened, unavailable = open_backends(config.backends, config.paths, config.device)
    if not opened:
        raise BundleError("no backend could run: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    first = next(iter(opened.values()))
    model_config = first.timed.config
    token_limit = first.captioner.token_limit
    if max(config.tokens) > token_limit:
        raise ValueError(f"tokens {max(config.tokens)} exceed what the model's positions allow ({token_limit})")
    peaks = measure_peaks(config.device)
    names = list(opened)
    cells = [(tokens, batch) for tokens in config.tokens for batch in config.batch_sizes]
    samples: dict[tuple[str, int, int], list[dict]] = {}
    total = len(cells) * len(names) * (config.warmup + config.iters)
    with tqdm(total=total, desc="latency", unit="run", disable=not progress) as bar:
        for tokens, batch_size in cells:
            images = synthetic_images(batch_size, config.image_size, config.seed)
            spent = dict.fromkeys(names, 0.0)
            for iteration in range(config.warmup + config.iters):
                # Rotate the order every iteration: no backend always runs first (or right after another).
                shift = iteration % len(names)
                for name in names[shift:] + names[:shift]:
                    bar.set_postfix_str(f"{name} b{batch_size} t{tokens}")
                    measured = samples.setdefault((name, batch_size, tokens), [])
                    over_budget = (config.time_budget_s is not None and len(measured) >= config.min_iters
                                   and spent[name] > config.time_budget_s * 1e3)
                    if not over_budget:
                        sample = measure_once(opened[name], images, tokens)
                        if iteration >= config.warmup:
                            measured.append(sample)
                            spent[name] += sample["end_to_end"]
                    bar.update()
    report = {
        "schema": LATENCY_SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "settings": {**_jsonable(asdict(config)), "decoding": FIXED_LENGTH_NOTE,
                     "threads": thread_counts(opened)},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "peaks": peaks,
        "backends": {name: {"available": name in opened, "what": BACKENDS[name].what,
                            "path": str(opened[name].path) if name in opened else None,
                            "reason": unavailable.get(name)} for name in config.backends},
        "cells": [summarize_cell(name, batch, tokens, cell_samples)
                  for (name, batch, tokens), cell_samples in samples.items()],
    }
    report["ratios"] = compute_ratios(report["cells"])
    report["roofline"] = roofline(report["cells"], model_config.gpt2, model_config.mapper.prefix_length,
                                  {name: decoder_weight_bytes(opened[name]) for name in names}, peaks)
    report["targets"] = evaluate_targets(report)
    check_report(report)
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ---------------------------------------------------------------------------------------------
# Statistics.


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation), mean and the sample count, in the values' unit."""
    array = np.asarray(values, dtype=np.float64)
    stats = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    return {**stats, "mean": float(array.mean()), "n": int(array.size)}


STAGES = ("preprocess", "encode", "first_step", "token_step", "decode", "end_to_end")


def summarize_cell(backend: str, batch_size: int, tokens: int, samples: list[dict]) -> dict:
    """One backend at one batch size and length: stage percentiles, throughput, per-token medians."""
    stages = {stage: percentiles([s[stage] for s in samples]) for stage in STAGES if stage != "token_step"}
    token_steps = np.asarray([s["token_steps"] for s in samples])  # (iterations, tokens - 1)
    if token_steps.size:
        stages["token_step"] = percentiles(token_steps.ravel().tolist())
    end_to_end = stages["end_to_end"]["p50"] / 1e3
    cell = {
        "backend": backend, "batch_size": batch_size, "tokens": tokens, "iterations": len(samples),
        "stages_ms": stages,
        "throughput": {"captions_per_s": batch_size / end_to_end, "tokens_per_s": batch_size * tokens / end_to_end,
                       "decode_tokens_per_s": batch_size * tokens / (stages["decode"]["p50"] / 1e3)},
        # Median over iterations of the step producing token k, for k = 2..tokens (token 1: the prefix step).
        "per_token_ms": np.median(token_steps, axis=0).tolist() if token_steps.size else [],
    }
    cell["flatness"] = flatness(cell["per_token_ms"])  # None below 60 tokens
    return cell


def find_cell(cells: list[dict], backend: str, batch_size: int, tokens: int) -> dict | None:
    return next((c for c in cells if (c["backend"], c["batch_size"], c["tokens"]) == (backend, batch_size, tokens)),
                None)


@dataclass(frozen=True)
class Ratio:
    name: str
    slower: str  # backend in the numerator: the ratio is how many times faster `faster` is
    faster: str
    stage: str  # which stage's p50 is compared


RATIOS = (
    Ratio("KV cache vs no-cache (paper's decoding), end to end", "torch-nocache", "torch", "end_to_end"),
    Ratio("KV cache vs no-cache, decode only", "torch-nocache", "torch", "decode"),
    Ratio("onnxruntime fp32 vs torch eager, end to end", "torch", "onnxruntime", "end_to_end"),
    Ratio("onnxruntime fp32 vs torch eager, decode only", "torch", "onnxruntime", "decode"),
    Ratio("int8 decoder vs fp32 decoder (onnxruntime), decode only", "onnxruntime", "onnxruntime-int8", "decode"),
    Ratio("int8 decoder vs fp32 decoder (onnxruntime), end to end", "onnxruntime", "onnxruntime-int8", "end_to_end"),
    Ratio("TensorRT vs onnxruntime fp32, end to end", "onnxruntime", "tensorrt", "end_to_end"),
)


def compute_ratios(cells: list[dict]) -> list[dict]:
    """Every `RATIOS` entry at every (batch size, tokens) where both backends ran: p50 / p50."""
    rows = []
    for ratio in RATIOS:
        for cell in cells:
            if cell["backend"] != ratio.faster:
                continue
            slower = find_cell(cells, ratio.slower, cell["batch_size"], cell["tokens"])
            if slower is None:
                continue
            value = slower["stages_ms"][ratio.stage]["p50"] / cell["stages_ms"][ratio.stage]["p50"]
            rows.append({"name": ratio.name, "slower": ratio.slower, "faster": ratio.faster, "stage": ratio.stage,
                         "batch_size": cell["batch_size"], "tokens": cell["tokens"], "speedup": value})
    return rows


def flatness(per_token_ms: list[float], first: int = 5, last: int = 60) -> dict | None:
    """How per-token step time changes from token `first` to token `last`.

    `trend`: the least-squares line through the per-token medians, its value at `last` over its value
    at `first`, minus one: a growth the noise of single steps cannot fake. `max_deviation`: the
    largest distance of one token's median from the median of the range (noise included).
    """
    # per_token_ms[i] is the step producing token i + 2.
    window = np.asarray(per_token_ms[first - 2: last - 1])
    if window.size < last - first + 1:
        return None
    tokens = np.arange(first, last + 1)
    slope, intercept = np.polyfit(tokens, window, 1)
    center = float(np.median(window))
    return {"tokens": [first, last], "median_ms": center,
            "trend": float((slope * last + intercept) / (slope * first + intercept) - 1),
            "max_deviation": float(np.abs(window / center - 1).max())}


# ---------------------------------------------------------------------------------------------
# Targets: measured and reported, never asserted.

SPEEDUP_TARGETS = (
    # (ratio name, minimum speed-up, batch size or None for every batch size, tokens or None for every length)
    ("KV cache vs no-cache (paper's decoding), end to end", 8.0, 1, 67),
    ("onnxruntime fp32 vs torch eager, end to end", 1.3, None, None),
    ("int8 decoder vs fp32 decoder (onnxruntime), decode only", 2.0, None, None),
)
FLATNESS_TARGET = 0.20  # per-token decode time within ±20% from token 5 to token 60 (cached backends)


def evaluate_targets(report: dict) -> list[dict]:
    rows = []
    for name, minimum, batch, tokens in SPEEDUP_TARGETS:
        matching = [r for r in report["ratios"] if r["name"] == name and batch in (None, r["batch_size"])
                    and tokens in (None, r["tokens"])]
        for ratio in matching:
            rows.append({"target": f"{name} >= {minimum:g}x", "where": f"batch {ratio['batch_size']}, "
                         f"{ratio['tokens']} tokens", "measured": f"{ratio['speedup']:.2f}x",
                         "met": ratio["speedup"] >= minimum})
        if not matching:
            rows.append({"target": f"{name} >= {minimum:g}x", "where": f"batch {batch or 'any'}, {tokens or 'any'} "
                         "tokens", "measured": "not measured (a backend unavailable or the cell not run)",
                         "met": None})
    for cell in report["cells"]:
        flat = cell.get("flatness")
        if flat is not None and BACKENDS[cell["backend"]].use_cache:
            rows.append({"target": f"{cell['backend']}: per-token decode flat within ±{FLATNESS_TARGET:.0%}, "
                         "tokens 5-60", "where": f"batch {cell['batch_size']}, {cell['tokens']} tokens",
                         "measured": f"trend {flat['trend']:+.1%} (single tokens up to {flat['max_deviation']:.0%} "
                         "off the median)", "met": abs(flat["trend"]) <= FLATNESS_TARGET})
    return rows


# ---------------------------------------------------------------------------------------------
# Roofline: what a decoder step must move and compute, against what this machine measurably does.


@dataclass(frozen=True)
class StepCost:
    flops: float  # multiply-adds x 2
    weight_bytes: float  # every decoder weight read once
    kv_bytes: float  # KV cache read (past) + written (new positions)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def gpt2_parameter_count(gpt2: GPT2Config) -> dict:
    """Parameters a decoder step reads: transformer blocks, final LayerNorm, LM head (tied to wte)."""
    e = gpt2.n_embd
    # c_attn (E x 3E), attn c_proj (E x E), c_fc (E x 4E), mlp c_proj (4E x E): 12 E^2 weights and 9 E
    # biases; two LayerNorms: 4 E.
    block = 12 * e * e + 9 * e + 4 * e
    return {"blocks": gpt2.n_layer * block, "final_norm": 2 * e, "lm_head": e * gpt2.vocab_size}


def decode_step_cost(gpt2: GPT2Config, batch: int, past: int, new: int, weight_bytes: float,
                     kv_dtype_bytes: int = 4) -> StepCost:
    """One GPT-2 step over `new` positions after `past` cached ones, logits for the last position only.

    `weight_bytes`: the decoder's weights as stored (fp32 ~4 B/parameter, dynamic int8 ~1 B).
    """
    e, layers = gpt2.n_embd, gpt2.n_layer
    total = past + new
    matmul = 2 * batch * new * layers * 12 * e * e  # QKV, projection, MLP
    attention = 2 * 2 * batch * layers * new * total * e  # QK^T and AV over every head
    lm_head = 2 * batch * e * gpt2.vocab_size  # one row of logits per image
    kv = 2 * layers * batch * (past + new) * e * kv_dtype_bytes  # keys and values: read the past, write the new
    return StepCost(matmul + attention + lm_head, weight_bytes, kv)


def decoder_weight_bytes(backend: OpenBackend) -> float:
    """Bytes of weights a decoder step reads: the decoder graph on disk (ONNX, int8 included), else
    GPT-2's parameters at fp32 (torch; TensorRT engines do not expose theirs)."""
    from clipcap.runtimes.onnx_runtime import OnnxRuntime

    runtime = backend.timed.inner
    if isinstance(runtime, OnnxRuntime):
        graph = backend.path / runtime.manifest["graphs"]["decoder"]["file"]
        data = graph.with_name(graph.name + ".data")
        return graph.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return 4.0 * sum(gpt2_parameter_count(backend.timed.config.gpt2).values())


def roofline(cells: list[dict], gpt2: GPT2Config, prefix_length: int, weight_bytes: dict[str, float],
             peaks: dict) -> dict:
    """Per cached backend and batch size (longest caption measured): the token step's cost at mid-caption,
    and the share of the measured matmul rate and copy bandwidth its p50 time (every token step pooled)
    reaches; plus the KV-cache speed-up these ceilings allow at all."""
    longest: dict[tuple[str, int], dict] = {}
    for cell in cells:
        key = (cell["backend"], cell["batch_size"])
        if BACKENDS[cell["backend"]].use_cache and "token_step" in cell["stages_ms"] and \
                (key not in longest or cell["tokens"] > longest[key]["tokens"]):
            longest[key] = cell
    rows = []
    for (backend, batch), cell in longest.items():
        token = cell["tokens"] // 2 + 1
        cost = token_step_cost(gpt2, prefix_length, token, batch, weight_bytes[backend])
        seconds = cell["stages_ms"]["token_step"]["p50"] / 1e3
        rows.append({"backend": backend, "batch_size": batch, "tokens": cell["tokens"], "token": token,
                     "step_ms": seconds * 1e3, "gflop": cost.flops / 1e9, "weight_mb": cost.weight_bytes / 1e6,
                     "kv_mb": cost.kv_bytes / 1e6, "gflops": cost.flops / seconds / 1e9,
                     "gbps": cost.bytes / seconds / 1e9,
                     "matmul_fraction": cost.flops / seconds / 1e9 / peaks["matmul_gflops"],
                     "bandwidth_fraction": cost.bytes / seconds / 1e9 / peaks["copy_gbps"],
                     "floor_ms": 1e3 * cost_floor_s(cost, peaks)})
    fp32 = 4.0 * sum(gpt2_parameter_count(gpt2).values())
    bounds = [{"batch_size": batch, "tokens": tokens,
               "speedup": kv_cache_speedup_bound(gpt2, prefix_length, tokens, batch, fp32, peaks)}
              for batch, tokens in sorted({(c["batch_size"], c["tokens"]) for c in cells})]
    return {"model": {"n_layer": gpt2.n_layer, "n_embd": gpt2.n_embd, "vocab_size": gpt2.vocab_size,
                      "parameters_read_per_step": sum(gpt2_parameter_count(gpt2).values()),
                      "prefix_length": prefix_length},
            "step_costs_fp32": step_cost_table(gpt2, prefix_length), "rows": rows, "kv_cache_bound": bounds}


def cost_floor_s(cost: StepCost, peaks: dict) -> float:
    """The least time a step can take on this machine: the slower of its compute and its memory traffic."""
    return max(cost.flops / 1e9 / peaks["matmul_gflops"], cost.bytes / 1e9 / peaks["copy_gbps"])


def kv_cache_speedup_bound(gpt2: GPT2Config, prefix_length: int, tokens: int, batch: int, weight_bytes: float,
                           peaks: dict) -> float:
    """Decode time without a cache over decode time with one, both at this machine's ceilings (fp32,
    last-position logits as the runtimes compute): the speed-up a perfect implementation would show."""
    cached = sum(cost_floor_s(token_step_cost(gpt2, prefix_length, k, batch, weight_bytes), peaks)
                 for k in range(1, tokens + 1))
    # Without a cache, the step producing token k runs the whole sequence: prefix + k - 1 positions.
    recomputed = sum(cost_floor_s(decode_step_cost(gpt2, batch, 0, prefix_length + k - 1, weight_bytes), peaks)
                     for k in range(1, tokens + 1))
    return recomputed / cached


def token_step_cost(gpt2: GPT2Config, prefix_length: int, token: int, batch: int, weight_bytes: float) -> StepCost:
    """The step that produces generated token `token` (1: the prefix step, past 0; k >= 2: one new
    position after prefix_length + k - 2 cached ones)."""
    if token == 1:
        return decode_step_cost(gpt2, batch, 0, prefix_length, weight_bytes)
    return decode_step_cost(gpt2, batch, prefix_length + token - 2, 1, weight_bytes)


def step_cost_table(gpt2: GPT2Config, prefix_length: int, tokens: tuple[int, ...] = (1, 5, 30, 60, 67),
                    batches: tuple[int, ...] = (1, 8), weight_bytes_per_parameter: float = 4.0) -> list[dict]:
    """What a decoder step must compute and move, by token and batch size (arithmetic, no measurement)."""
    weights = weight_bytes_per_parameter * sum(gpt2_parameter_count(gpt2).values())
    rows = []
    for batch in batches:
        for token in tokens:
            cost = token_step_cost(gpt2, prefix_length, token, batch, weights)
            rows.append({"batch_size": batch, "token": token, "gflop": cost.flops / 1e9,
                         "weight_mb": cost.weight_bytes / 1e6, "kv_mb": cost.kv_bytes / 1e6,
                         "flop_per_byte": cost.flops / cost.bytes})
    return rows


def measure_peaks(device: str = "cpu", matmul_size: int = 2048, copy_mb: int = 256, repeats: int = 5) -> dict:
    """This machine's fp32 matmul rate and memory copy bandwidth at the current thread count (best of
    `repeats`, the least disturbed by neighbours): the roofline's ceilings."""
    target = torch.device(device)

    def best_seconds(work: Callable[[], Any]) -> float:
        work()  # warm-up: allocation, kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            times.append(time.perf_counter() - start)
        return min(times)

    a = torch.randn(matmul_size, matmul_size, device=target)
    b = torch.randn(matmul_size, matmul_size, device=target)
    out = torch.empty_like(a)
    matmul_s = best_seconds(lambda: torch.matmul(a, b, out=out))
    source = torch.empty(copy_mb * 2**20 // 4, device=target).normal_()
    target_buffer = torch.empty_like(source)
    copy_s = best_seconds(lambda: target_buffer.copy_(source))
    return {"matmul_gflops": 2 * matmul_size**3 / matmul_s / 1e9, "matmul_size": matmul_size,
            # A copy reads and writes every byte once.
            "copy_gbps": 2 * source.numel() * 4 / copy_s / 1e9, "copy_mb": copy_mb,
            "threads": torch.get_num_threads(), "device": device}


# ---------------------------------------------------------------------------------------------
# Machine description.


def machine_info(device: str = "cpu") -> dict:
    from importlib import metadata

    import psutil

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "onnxruntime", "onnxruntime-gpu", "transformers",
                                              "open_clip_torch", "tensorrt", "torchserve", "aiohttp")},
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": properties.name, "memory_gb": round(properties.total_memory / 1e9, 1),
                       "cuda": torch.version.cuda}
    return info


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def thread_counts(opened: dict[str, OpenBackend]) -> dict:
    """The thread counts actually in force: torch's, and each onnxruntime session's intra-op setting."""
    from clipcap.runtimes.onnx_runtime import OnnxRuntime

    counts = {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}
    for name, backend in opened.items():
        runtime = backend.timed.inner
        if isinstance(runtime, OnnxRuntime):
            session = runtime.sessions["decoder"]
            counts[f"{name}_intra_op"] = session.get_session_options().intra_op_num_threads
    return counts


# ---------------------------------------------------------------------------------------------
# Report schema.

_LATENCY_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                 "peaks": dict, "backends": dict, "cells": list, "ratios": list, "roofline": dict, "targets": list}
_CELL_KEYS = {"backend": str, "batch_size": int, "tokens": int, "iterations": int, "stages_ms": dict,
              "throughput": dict, "per_token_ms": list}
_SERVING_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                 "cells": list}
_SERVING_CELL_KEYS = {"model": str, "concurrency": int, "sent": int, "ok": int, "statuses": dict,
                      "wall_s": float, "requests_per_s": float, "latency_ms": dict}


def check_report(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    schema = report.get("schema")
    if schema not in (LATENCY_SCHEMA, SERVING_SCHEMA):
        raise ValueError(f"unknown report schema {schema!r}")
    latency = schema == LATENCY_SCHEMA
    _check_keys(report, _LATENCY_KEYS if latency else _SERVING_KEYS, "report")
    for index, cell in enumerate(report["cells"]):
        _check_keys(cell, _CELL_KEYS if latency else _SERVING_CELL_KEYS, f"cells[{index}]")
        stats = cell["stages_ms"].values() if latency else [cell["latency_ms"]]
        for stat in stats:
            _check_keys(stat, {"p50": float, "p90": float, "p99": float, "mean": float, "n": int}, f"cells[{index}]")
        if latency and len(cell["per_token_ms"]) != cell["tokens"] - 1:
            raise ValueError(f"cells[{index}].per_token_ms: {len(cell['per_token_ms'])} values for "
                             f"{cell['tokens']} tokens (expected tokens - 1)")


def _check_keys(data: dict, keys: dict[str, type], where: str) -> None:
    for key, kind in keys.items():
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(data[key]).__name__}")


def write_json(report: dict, path: Path) -> Path:
    check_report(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The full-size model for speed work: nothing can be downloaded, so random weights.

FULL_SIZE_CAPTIONS = [
    "a dog runs on the grass.", "two cats sleep on a sofa.", "a man rides a bicycle down the street.",
    "a plate of food on a wooden table.", "a red bus parked next to a building.", "a bird sits on a branch.",
]


def make_full_size_bundles(out: Path, int8: bool = True) -> dict[str, Path]:
    """ViT-B-32 + GPT-2 small (random weights, a small BPE tokenizer) as a model bundle, its fp32
    ONNX export and (with `int8`) the int8 sibling: out/model, out/onnx, out/onnx-int8.

    Steps whose output already exists are skipped, so a second call costs nothing. Random weights
    time exactly like trained ones: the same shapes do the same arithmetic.
    """
    from clipcap.formats.model_bundle import save_bundle
    from clipcap.config import TokenizerConfig
    from clipcap.model import ClipCapModel, resolve_clip_config
    from clipcap.export.onnx import ExportOptions, export_bundle
    from clipcap.formats.export_bundle import MANIFEST_FILE
    from clipcap.export.int8 import QuantizeConfig, quantize_bundle
    from clipcap.tokenizer import train_bpe

    out = Path(out)
    paths = {"model": out / "model", "onnx-fp32": out / "onnx"}
    if not (paths["model"] / "model.safetensors").is_file():
        torch.manual_seed(0)
        tokenizer = train_bpe(FULL_SIZE_CAPTIONS * 4, vocab_size=300)
        tokens = TokenizerConfig(eos_token_id=tokenizer.eos_token_id, stop_token_ids=tokenizer.stop_token_ids())
        model = ClipCapModel(ClipCapConfig(clip=resolve_clip_config("ViT-B-32"), tokenizer=tokens).validate())
        save_bundle(model.eval(), tokenizer, paths["model"])
    if not (paths["onnx-fp32"] / MANIFEST_FILE).is_file():
        export_bundle(paths["model"], ExportOptions(out=paths["onnx-fp32"]))
    if int8:
        paths["onnx-int8"] = out / "onnx-int8"
        if not (paths["onnx-int8"] / MANIFEST_FILE).is_file():
            quantize_bundle(QuantizeConfig(paths["onnx-fp32"], paths["onnx-int8"]))
    return paths


# ---------------------------------------------------------------------------------------------
# Markdown and plots.


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _header(report: dict, title: str) -> list[str]:
    machine, load = report["machine"], report["load_average"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    gpu = f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else "; no GPU"
    return [f"# {title}", "",
            f"Measured {report['created_utc']} on **{machine['cpu']}**, {machine['logical_cores']} logical cores, "
            f"{machine['memory_gb']} GB{gpu}; {machine['os']}.", "", f"Versions: {versions}.", "",
            f"Load average (1/5/15 min) before {', '.join(f'{v:.2f}' for v in load['before'])}; after "
            f"{', '.join(f'{v:.2f}' for v in load['after'])} (a shared machine: compare ratios, not absolutes).", ""]


def latency_markdown(report: dict) -> str:
    settings, peaks = report["settings"], report["peaks"]
    threads = ", ".join(f"{k} {v}" for k, v in settings["threads"].items())
    lines = _header(report, "Latency per stage, backend and batch size") + [
        f"Settings: device {settings['device']}, warm-up {settings['warmup']} + {settings['iters']} measured iterations "
        f"per backend and cell" + (f" (a backend stops after {settings['time_budget_s']:g} s of measured time in a "
                                   f"cell, never before {settings['min_iters']} iterations: see `n`)"
                                   if settings["time_budget_s"] else "")
        + f"; backends interleaved round-robin, the order rotated every iteration; threads: {threads}; input images "
        f"{settings['image_size'][0]}x{settings['image_size'][1]} RGB.", "",
        f"Decoding: {settings['decoding']}.", "",
        f"This machine's ceilings (best of 5, {peaks['threads']} thread(s)): fp32 matmul {peaks['matmul_gflops']:.1f} "
        f"GFLOP/s ({peaks['matmul_size']}^3), memory copy {peaks['copy_gbps']:.1f} GB/s ({peaks['copy_mb']} MB, read + write).",
        "", "## Backends", "", "| backend | what | status |", "|---|---|---|"]
    for name, info in report["backends"].items():
        status = "measured" if info["available"] else f"unavailable: {info['reason']}"
        lines.append(f"| {name} | {info['what']} | {status} |")
    lines += ["", "## Stages (ms; p50 unless marked; `n` measured iterations)", "",
              "| backend | batch | tokens | n | preprocess | encode | first step | token step p50 / p99 | decode "
              "| end to end p50 / p90 / p99 | captions/s | tokens/s |", "|---|" + "---:|" * 11]
    for cell in sorted(report["cells"], key=lambda c: (c["tokens"], c["batch_size"], c["backend"])):
        s = cell["stages_ms"]
        token = f"{_fmt(s['token_step']['p50'])} / {_fmt(s['token_step']['p99'])}" if "token_step" in s else "–"
        e2e = s["end_to_end"]
        lines.append(f"| {cell['backend']} | {cell['batch_size']} | {cell['tokens']} | {cell['iterations']} | "
                     f"{_fmt(s['preprocess']['p50'])} | {_fmt(s['encode']['p50'])} | {_fmt(s['first_step']['p50'])} | "
                     f"{token} | {_fmt(s['decode']['p50'])} | {_fmt(e2e['p50'])} / {_fmt(e2e['p90'])} / "
                     f"{_fmt(e2e['p99'])} | {cell['throughput']['captions_per_s']:.2f} | "
                     f"{cell['throughput']['tokens_per_s']:.1f} |")
    lines += ["", "## Speed-ups (p50 over p50, both from this run)", "", "| comparison | batch | tokens | speed-up |",
              "|---|---:|---:|---:|"]
    for ratio in report["ratios"]:
        lines.append(f"| {ratio['name']} | {ratio['batch_size']} | {ratio['tokens']} | {ratio['speedup']:.2f}x |")
    trends = [c for c in report["cells"] if c.get("flatness")]
    if trends:
        lines += ["", "## Per-token decode time, tokens 5 to 60", "",
                  "Trend: the least-squares line through the per-token medians, its value at token 60 over token 5. "
                  "Plotted in per_token_decode.png.", "",
                  "| backend | batch | tokens | median step ms | trend 5 -> 60 | largest single-token deviation |",
                  "|---|---:|---:|---:|---:|---:|"]
        for cell in trends:
            flat = cell["flatness"]
            lines.append(f"| {cell['backend']} | {cell['batch_size']} | {cell['tokens']} | {flat['median_ms']:.1f} | "
                         f"{flat['trend']:+.0%} | {flat['max_deviation']:.0%} |")
    lines += ["", "## Targets", "", "| target | where | measured | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        met = {True: "**met**", False: "**missed**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['target']} | {target['where']} | {target['measured']} | {met} |")
    roof = report["roofline"]
    model = roof["model"]
    lines += ["", "## Roofline: what one decoder step computes and moves", "",
              f"GPT-2 with {model['n_layer']} layers, width {model['n_embd']}, vocabulary {model['vocab_size']}: "
              f"{model['parameters_read_per_step'] / 1e6:.1f} M parameters read per step (blocks + LM head). FLOPs: "
              "2 x (12 E^2 per layer + LM head E V) per image + attention 4 E x context per layer; bytes: decoder "
              "weights as stored (ONNX graph size, int8 included) + KV cache read and written. Fractions are of the "
              "ceilings above; `floor` is the slower of compute and memory at those ceilings.", "",
              f"Machine balance here: {peaks['matmul_gflops'] / peaks['copy_gbps']:.1f} FLOP per byte; a step below "
              "that is memory-bound.", "",
              "| batch | token | GFLOP | weights MB (fp32) | KV MB | FLOP / byte |", "|---:|---:|---:|---:|---:|---:|"]
    for row in roof["step_costs_fp32"]:
        lines.append(f"| {row['batch_size']} | {row['token']}{' (prefix step)' if row['token'] == 1 else ''} | "
                     f"{row['gflop']:.3f} | {row['weight_mb']:.0f} | {row['kv_mb']:.2f} | {row['flop_per_byte']:.2f} |")
    lines += ["", "Measured: the token step's p50 (all tokens of all iterations) against the cost at mid-caption:", "",
              "| backend | batch | step ms | GFLOP | weights MB | KV MB | GFLOP/s (of matmul) | GB/s (of copy) | floor ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in roof["rows"]:
        lines.append(f"| {row['backend']} | {row['batch_size']} | {row['step_ms']:.1f} | {row['gflop']:.2f} | "
                     f"{row['weight_mb']:.0f} | {row['kv_mb']:.1f} | {row['gflops']:.1f} ({row['matmul_fraction']:.0%}) | "
                     f"{row['gbps']:.1f} ({row['bandwidth_fraction']:.0%}) | {row['floor_ms']:.1f} |")
    if any(row["backend"].endswith("int8") for row in roof["rows"]):
        lines += ["", "int8 rows: their matrix products run in int8 (VNNI dot products where the CPU has them), whose "
                  "rate is above the fp32 matmul ceiling measured here, so their share of it can pass 100% and "
                  "their compute floor is overstated."]
    lines += ["", "The KV-cache speed-up these ceilings allow (decode, fp32, a perfect implementation of both: the cached "
              "step bound by memory, the recomputing one by compute): " + ", ".join(
                  f"batch {b['batch_size']} x {b['tokens']} tokens {b['speedup']:.1f}x" for b in roof["kv_cache_bound"])
              + "."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path) -> Path:
    """Lay out, write as PNG and free a matplotlib figure (pyplot keeps every open figure alive)."""
    plt = _pyplot()

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_latency(report: dict, path: Path) -> Path:
    """End-to-end p50 latency (bars to p90) and captions/s against batch size, a panel per caption length."""
    plt = _pyplot()
    lengths = sorted({c["tokens"] for c in report["cells"]})
    figure, axes = plt.subplots(2, len(lengths), figsize=(5.5 * len(lengths), 8), squeeze=False)
    for column, tokens in enumerate(lengths):
        for backend in report["backends"]:
            cells = sorted((c for c in report["cells"] if c["backend"] == backend and c["tokens"] == tokens),
                           key=lambda c: c["batch_size"])
            if not cells:
                continue
            batches = [c["batch_size"] for c in cells]
            p50 = np.array([c["stages_ms"]["end_to_end"]["p50"] for c in cells])
            p90 = np.array([c["stages_ms"]["end_to_end"]["p90"] for c in cells])
            axes[0, column].errorbar(batches, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3,
                                     label=backend)
            axes[1, column].plot(batches, [c["throughput"]["captions_per_s"] for c in cells], marker="o", label=backend)
        for row, label in ((0, "end to end, ms (p50, bar to p90)"), (1, "captions / s")):
            axis = axes[row, column]
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("batch size")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        axes[0, column].set_title(f"{tokens} tokens per caption (fixed length)")
    figure.suptitle(f"{report['machine']['cpu']} ({report['settings']['device']}, "
                    f"{report['settings']['threads']['torch_intra_op']} thread(s))")
    return _save_figure(figure, path)


def plot_per_token(report: dict, path: Path) -> Path:
    """Median time of each decoder step against the token it produces (longest caption), a panel per batch size."""
    plt = _pyplot()
    tokens = max(c["tokens"] for c in report["cells"])
    batches = sorted({c["batch_size"] for c in report["cells"] if c["tokens"] == tokens})
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for cell in report["cells"]:
            if (cell["tokens"], cell["batch_size"]) == (tokens, batch) and cell["per_token_ms"]:
                axis.plot(range(2, tokens + 1), cell["per_token_ms"], label=cell["backend"])
        axis.set_yscale("log")
        axis.set_xlabel("token produced by the step")
        axis.set_ylabel("step time, ms (median over iterations)")
        axis.set_title(f"batch {batch}, {tokens} tokens")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Per-token decode: flat with a KV cache, growing without (the paper's decoding)")
    return _save_figure(figure, path)


def write_latency_outputs(report: dict, out: Path) -> list[Path]:
    """latency.json, latency.md, latency_vs_batch.png, per_token_decode.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.md").write_text(latency_markdown(report))
    return [write_json(report, out / "latency.json"), out / "latency.md",
            plot_latency(report, out / "latency_vs_batch.png"), plot_per_token(report, out / "per_token_decode.png")]


# ---------------------------------------------------------------------------------------------
# Serving load: a bounded aiohttp load generator against TorchServe on loopback.


@dataclass
class ServingLoadConfig:
    url: str = "http://127.0.0.1:8080"  # TorchServe's inference address; loopback only
    models: list[str] = field(default_factory=lambda: ["clipcap"])  # registered model names, compared side by side
    concurrency: list[int] = field(default_factory=lambda: [1, 8])  # clients sending back to back
    requests: int = 200  # per model and concurrency level (split over `rounds`)
    duration_s: float = 60.0  # cap per model and concurrency level: a block stops sending when it is reached
    rounds: int = 2  # each (model, level) block runs in this many rounds, models alternating between rounds
    warmup: int = 4  # requests per model sent first and not counted
    timeout_s: float = 120.0  # per request
    images: list[Path] = field(default_factory=list)  # image files sent in turn; none: synthetic JPEGs
    management_url: str | None = None  # TorchServe's management address: each model's batching settings are recorded

    def validate(self) -> "ServingLoadConfig":
        check_loopback(self.url)
        if self.management_url is not None:
            check_loopback(self.management_url)
        if not self.models or any(not m or "/" in m for m in self.models):
            raise ValueError(f"models must be TorchServe model names, got {self.models}")
        if not self.concurrency or min(self.concurrency) < 1 or self.requests < 1 or self.rounds < 1:
            raise ValueError("concurrency levels, requests and rounds must be >= 1")
        if self.duration_s <= 0 or self.timeout_s <= 0 or self.warmup < 0:
            raise ValueError("duration and timeout must be > 0, warmup >= 0")
        return self


def check_loopback(url: str) -> None:
    """Refuse anything but http(s) to this machine's loopback: a benchmark must not load someone else's server."""
    import ipaddress

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected http://127.0.0.1:PORT")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url!r}: the load generator only targets loopback (127.0.0.1, ::1, localhost), not {host}")


def request_bodies(images: list[Path], seed: int = 0) -> list[tuple[bytes, str]]:
    """(bytes, content type) per image file; with none given, four synthetic 640x480 JPEGs."""
    import io

    if images:
        types = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".bmp": "image/bmp"}
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image file(s) not found: {', '.join(missing[:3])}")
        return [(Path(p).read_bytes(), types.get(Path(p).suffix.lower(), "application/octet-stream")) for p in images]
    bodies = []
    for image in synthetic_images(4, (640, 480), seed):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        bodies.append((buffer.getvalue(), "image/jpeg"))
    return bodies


async def _block(session, url: str, bodies: list, clients: int, count: int, deadline: float) -> list[dict]:
    """`count` requests from `clients` concurrent clients (fewer if `deadline` passes): one record each."""
    records: list[dict] = []
    indices = iter(range(count))

    async def client() -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            data, content_type = bodies[index % len(bodies)]
            start = time.perf_counter()
            async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
                body = await response.read()
            record = {"status": response.status, "latency_ms": (time.perf_counter() - start) * 1e3}
            if response.status == 200:
                record["handler_ms"] = sum(json.loads(body).get("timings_ms", {}).values())
            elif len(records) < 3 or all(r["status"] == 200 for r in records):
                record["error"] = body[:300].decode(errors="replace")
            records.append(record)

    await asyncio.gather(*(client() for _ in range(clients)))
    return records


SERVER_SETTINGS = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout", "deviceType")


async def _describe_models(session, config: ServingLoadConfig, key: str | None) -> dict:
    """Each model's batching and worker settings, from TorchServe's management API (GET /models/NAME)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    described = {}
    for model in config.models:
        async with session.get(f"{config.management_url.rstrip('/')}/models/{model}", headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"management API answered {response.status} for model {model!r}: "
                                   f"{body[:300].decode(errors='replace')}")
        entry = json.loads(body)[0]
        described[model] = {**{k: entry[k] for k in SERVER_SETTINGS if k in entry},
                            "workers": len(entry.get("workers", []))}
    return described


async def _serving_load(config: ServingLoadConfig, keys: dict[str, str] | None, bodies: list,
                        progress: bool) -> tuple[dict, dict]:
    import aiohttp
    from tqdm import tqdm

    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    base = config.url.rstrip("/")
    results: dict[tuple[str, int], dict] = {}
    server = {}
    if config.management_url:
        async with aiohttp.ClientSession(timeout=timeout) as describe_session:
            server = await _describe_models(describe_session, config, (keys or {}).get("management"))
    headers = {"Authorization": f"Bearer {keys['inference']}"} if keys else {}
    # One connection per client at the highest level: a pool smaller than the concurrency would queue in the client.
    connector = aiohttp.TCPConnector(limit=max(config.concurrency))
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        for model in config.models:
            warmup = await _block(session, f"{base}/predictions/{model}", bodies, 1, config.warmup,
                                  time.monotonic() + config.timeout_s)
            failed = [r for r in warmup if r["status"] != 200]
            if failed:
                raise RuntimeError(f"model {model!r} at {base}: warm-up request answered {failed[0]['status']}: "
                                   f"{failed[0].get('error', '')} (wrong model name, or a missing/expired token?)")
        per_round = -(-config.requests // config.rounds)
        total = len(config.concurrency) * config.rounds * len(config.models)
        with tqdm(total=total, desc="serving load", unit="block", disable=not progress) as bar:
            for level in config.concurrency:
                for round_index in range(config.rounds):
                    shift = round_index % len(config.models)
                    for model in config.models[shift:] + config.models[:shift]:
                        cell = results.setdefault((model, level), {"records": [], "wall_s": 0.0})
                        remaining = config.requests - len(cell["records"])
                        # The duration cap counts this model's own sending time at this level, over its rounds.
                        deadline = time.monotonic() + config.duration_s - cell["wall_s"]
                        bar.set_postfix_str(f"{model} x{level}")
                        start = time.perf_counter()
                        cell["records"] += await _block(session, f"{base}/predictions/{model}", bodies, level,
                                                        min(per_round, remaining), deadline)
                        cell["wall_s"] += time.perf_counter() - start
                        bar.update()
    return results, server


def read_api_keys(key_file: Path) -> dict[str, str]:
    """The "inference" and "management" keys from the key_file.json TorchServe writes at start."""
    try:
        keys = json.loads(Path(key_file).read_text())
        return {kind: keys[kind]["key"] for kind in ("inference", "management")}
    except FileNotFoundError:
        raise FileNotFoundError(f"{key_file}: not found; TorchServe writes it into the directory it starts in "
                                "(or pass --no-token for a server started with --disable-token-auth)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{key_file}: not a TorchServe key file ({error!r})") from None


def run_serving_load(config: ServingLoadConfig, keys: dict[str, str] | None, progress: bool = True) -> dict:
    """Load every model at every concurrency level, models alternating; returns the report (`check_report`).

    `keys` (`read_api_keys`; None: token authorization off) are sent as Bearer headers, never written out.
    """
    config.validate()
    bodies = request_bodies(config.images)
    load_before = os.getloadavg()
    results, server = asyncio.run(_serving_load(config, keys, bodies, progress))
    cells = []
    for (model, level), result in results.items():
        records = result["records"]
        ok = [r for r in records if r["status"] == 200]
        if not ok:
            first = records[0] if records else {"status": "none"}
            raise RuntimeError(f"model {model!r}, concurrency {level}: no request succeeded; first answer "
                               f"{first['status']}: {first.get('error', '')}")
        statuses: dict[str, int] = {}
        for record in records:
            statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
        cells.append({"model": model, "concurrency": level, "sent": len(records), "ok": len(ok), "statuses": statuses,
                      "wall_s": result["wall_s"], "requests_per_s": len(ok) / result["wall_s"],
                      "latency_ms": percentiles([r["latency_ms"] for r in ok]),
                      "handler_ms": percentiles([r["handler_ms"] for r in ok]),
                      "errors": [r["error"] for r in records if "error" in r][:3]})
    settings = {**_jsonable(asdict(config)), "images": [str(p) for p in config.images] or "4 synthetic 640x480 JPEGs",
                "token_authorization": keys is not None, "server": server}
    report = {"schema": SERVING_SCHEMA, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "settings": settings,
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, "cells": cells}
    check_report(report)
    return report


def serving_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = _header(report, "Serving: TorchServe under load") + [
        f"Target {settings['url']}, models {', '.join(settings['models'])} (alternating, {settings['rounds']} rounds "
        f"per level); {settings['requests']} requests per model and level, capped at {settings['duration_s']:g} s; "
        f"{settings['warmup']} warm-up requests per model; token authorization "
        f"{'on' if settings['token_authorization'] else 'off'}; images: {settings['images']}.", "",
        "Latency is the client's (request sent to answer read); `handler` is the time the handler reports "
        "(preprocess + encode + decode of the batch the request was in).", ""]
    for model, described in settings["server"].items():
        lines.append(f"- server settings of {model}: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    if settings["server"]:
        lines.append("")
    lines += [
        "| model | concurrency | ok / sent | req/s | vs first model | latency p50 | p90 | p99 | handler p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = report["settings"]["models"][0]
    for cell in sorted(report["cells"], key=lambda c: (c["concurrency"], c["model"])):
        base = next(c for c in report["cells"] if c["model"] == first and c["concurrency"] == cell["concurrency"])
        latency = cell["latency_ms"]
        lines.append(f"| {cell['model']} | {cell['concurrency']} | {cell['ok']} / {cell['sent']} | "
                     f"{cell['requests_per_s']:.2f} | {cell['requests_per_s'] / base['requests_per_s']:.2f}x | "
                     f"{_fmt(latency['p50'])} | {_fmt(latency['p90'])} | {_fmt(latency['p99'])} | "
                     f"{_fmt(cell['handler_ms']['p50'])} |")
    errors = [f"- {c['model']} x{c['concurrency']}: {c['statuses']} {c['errors']}" for c in report["cells"]
              if set(c["statuses"]) != {"200"}]
    if errors:
        lines += ["", "Non-200 answers:", *errors]
    return "\n".join(lines) + "\n"


def plot_serving(report: dict, path: Path) -> Path:
    """req/s and latency p50/p99 against concurrency, a line per model."""
    plt = _pyplot()
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in report["settings"]["models"]:
        cells = sorted((c for c in report["cells"] if c["model"] == model), key=lambda c: c["concurrency"])
        levels = [c["concurrency"] for c in cells]
        throughput.plot(levels, [c["requests_per_s"] for c in cells], marker="o", label=model)
        line, = latency.plot(levels, [c["latency_ms"]["p50"] for c in cells], marker="o", label=f"{model} p50")
        latency.plot(levels, [c["latency_ms"]["p99"] for c in cells], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{model} p99")
    for axis, label in ((throughput, "requests / s"), (latency, "latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    latency.set_yscale("log")
    figure.suptitle(f"TorchServe on {report['machine']['cpu']} ({report['machine']['logical_cores']} cores)")
    return _save_figure(figure, path)


def write_serving_outputs(report: dict, out: Path) -> list[Path]:
    """serving.json, serving.md, serving.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.md").write_text(serving_markdown(report))
    return [write_json(report, out / "serving.json"), out / "serving.md", plot_serving(report, out / "serving.png")]
