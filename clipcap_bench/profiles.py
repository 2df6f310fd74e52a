"""The quick profile: 51 s on a quiet 2-core machine (benchmarks/README.md), meant for every change;
the full profile is benchmarks/latency.py.

Latency: the demo model (`models/shapes-demo`: CLIP ViT at 64 px, 3-layer GPT-2 of width 128) on
torch, torch-nocache, onnxruntime fp32 and int8, interleaved as in the full profile, small cells.
Serving: the same model behind a real, private TorchServe (the torch bundle and its ONNX export,
as two models), loaded at two concurrency levels by the same load generator as benchmarks/serving.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QuickProfile:
    bundle: Path = Path("models/shapes-demo")  # the demo model bundle shipped in the repository
    work: Path = Path("build/bench/quick")  # exports and .mar files, rebuilt when the bundle or library changes
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    tokens: list[int] = field(default_factory=lambda: [40])  # the demo model allows 60
    warmup: int = 1  # iterations per backend and cell, not counted
    iters: int = 7  # measured iterations per backend and cell
    threads: int = 1  # torch (and onnxruntime intra-op) threads; TorchServe workers get OMP_NUM_THREADS=1
    concurrency: list[int] = field(default_factory=lambda: [1, 4])  # serving load levels
    requests: int = 48  # per served model and level, in `rounds` rounds
    rounds: int = 4  # rounds per level, the two models alternating: their rates' spread is the noise
    serve: bool = True  # False: latency only (no Java needed)


def run_quick_latency(profile: QuickProfile, repo: Path, progress: bool = True) -> dict:
    from clipcap_bench.bundles import make_demo_exports
    from clipcap_bench.latency import LatencyConfig, run_latency

    exports = make_demo_exports(repo / profile.bundle, repo / profile.work / "exports", repo / "clipcap", progress)
    config = LatencyConfig(paths=[repo / profile.bundle, exports["onnx-fp32"], exports["onnx-int8"]],
                           backends=["torch", "torch-nocache", "onnxruntime", "onnxruntime-int8"],
                           batch_sizes=profile.batch_sizes, tokens=profile.tokens, warmup=profile.warmup,
                           iters=profile.iters, threads=profile.threads)
    return run_latency(config, progress=progress)


def run_quick_serving(profile: QuickProfile, repo: Path, progress: bool = True) -> dict:
    """Pack the demo bundle (torch) and its export (onnxruntime) as two models, serve, load, stop."""
    from clipcap_bench.bundles import make_demo_exports
    from clipcap_bench.load import ServingLoadConfig, run_serving_load
    from clipcap_bench.torchserve import LocalTorchServe, pack_archives

    work = repo / profile.work
    exports = make_demo_exports(repo / profile.bundle, work / "exports", repo / "clipcap", progress)
    store = work / "model_store"
    pack_archives(store, {"clipcap-torch": (repo / profile.bundle, None),
                          "clipcap-onnx": (exports["onnx-fp32"], "onnxruntime")}, repo, progress)
    images = sorted((repo / "samples").glob("*.png"))
    with LocalTorchServe(work / "torchserve", store, ["clipcap-torch", "clipcap-onnx"], repo,
                         threads=profile.threads) as server:
        config = ServingLoadConfig(url=server.url, management_url=server.management_url,
                                   models=["clipcap-torch", "clipcap-onnx"], concurrency=profile.concurrency,
                                   requests=profile.requests, rounds=profile.rounds, images=images)
        return run_serving_load(config, server.keys(), progress=progress)
