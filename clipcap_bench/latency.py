"""The latency run: every backend side by side, interleaved round-robin per iteration.

Backends take turns, the order rotated every iteration, so a busy neighbour slows all of them
alike and every claim is a ratio of two numbers from the same run. Generation is fixed length (the
stop token is ignored), so every backend generates exactly the same number of tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcap_bench.experiment import rotation
from clipcap_bench.backends import BACKENDS, OpenBackend, open_backends
from clipcap_bench.machine import thread_counts
from clipcap_bench.roofline import decoder_weight_bytes, encoder_roofline, graph_bytes, measure_peaks, roofline
from clipcap_bench.schema import LATENCY_SCHEMA, Envelope, check_report
from clipcap_bench.statistics import compute_ratios, evaluate_targets, summarize_cell
from clipcap_bench.steps import run_steps
from clipcap.config import BundleError
from clipcap.runtimes import set_compute_threads


FIXED_LENGTH_NOTE = ("fixed-length greedy generation: the stop token is ignored, so every backend generates "
                     "exactly `tokens` tokens per image and does identical work")


@dataclass
class LatencyConfig:
    paths: list[Path]  # model bundle and/or export bundles; each backend takes the kind it needs
    backends: list[str] = field(default_factory=lambda: ["torch", "torch-nocache", "onnxruntime", "onnxruntime-int8",
                                                         "onnxruntime-int8-wo", "onnxruntime-int4-wo", "tensorrt"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    tokens: list[int] = field(default_factory=lambda: [20, 67])  # 67: the paper's entry_length
    device: str = "cpu"  # cpu | cuda[:N]
    warmup: int = 1  # iterations per backend and cell, run and thrown away
    iters: int = 5  # measured iterations per backend and cell
    time_budget_s: float | None = None  # a backend stops early in a cell once its measured time passes this
    min_iters: int = 2  # ... but never before this many measured iterations
    threads: int = 1  # set_compute_threads: torch's and every onnxruntime session's intra-op threads
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
    set_compute_threads(config.threads)  # torch and the onnxruntime sessions opened after this
    envelope = Envelope(LATENCY_SCHEMA, config.device)
    [(opened, unavailable)] = run_steps(  # a full-size model takes seconds to load
        [("load " + ", ".join(config.backends), lambda: open_backends(config.backends, config.paths, config.device))],
        "backends", progress)
    if not opened:
        raise BundleError("no backend could run: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    first = next(iter(opened.values()))
    model_config = first.timed.config
    token_limit = first.captioner.token_limit
    if max(config.tokens) > token_limit:
        raise ValueError(f"tokens {max(config.tokens)} exceed what the model's positions allow ({token_limit})")
    [peaks] = run_steps([("matmul and memory ceilings", lambda: measure_peaks(config.device))], "machine peaks",
                        progress)
    names = list(opened)
    cells = [(tokens, batch) for tokens in config.tokens for batch in config.batch_sizes]
    samples: dict[tuple[str, int, int], list[dict]] = {}
    total = len(cells) * len(names) * (config.warmup + config.iters)
    with tqdm(total=total, desc="latency", unit="run", disable=not progress) as bar:
        for tokens, batch_size in cells:
            images = synthetic_images(batch_size, config.image_size, config.seed)
            spent = dict.fromkeys(names, 0.0)
            for iteration in range(config.warmup + config.iters):
                for name in rotation(names, iteration):
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
    report = envelope.report(
        {**asdict(config), "decoding": FIXED_LENGTH_NOTE, "threads": thread_counts(opened)},
        peaks=peaks,
        backends={name: {"available": name in opened, "what": BACKENDS[name].what,
                         "path": str(opened[name].path) if name in opened else None,
                         "reason": unavailable.get(name)} for name in config.backends},
        cells=[summarize_cell(name, batch, tokens, cell_samples)
               for (name, batch, tokens), cell_samples in samples.items()])
    report["ratios"] = compute_ratios(report["cells"])
    report["roofline"] = roofline(report["cells"], model_config.gpt2, model_config.mapper.prefix_length,
                                  {name: decoder_weight_bytes(opened[name]) for name in names}, peaks)
    report["roofline"]["encoder"] = encoder_roofline(report["cells"], model_config.clip,
                                                     {name: graph_bytes(opened[name], "encoder") for name in names}, peaks)
    report["targets"] = evaluate_targets(report)
    check_report(report)
    return report
