"""Open-loop serving load for the photo profile: each bundle (the demo model by default; any model or export
bundle) packed into a .mar and served alone by a private TorchServe with the shipped model-config.yaml,
images (12 MP phone JPEGs, or samples/ PNGs) arriving as a Poisson process at each offered rate
(clipcap_bench.load.run_open_loop). Per bundle and rate: p50/p99 and the fraction answered within the
latency objective; per bundle its capacity (the highest rate meeting the objective) and its ratio to the
first bundle's, against the capacity target (targets.toml); as markdown and a plot.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clipcap_bench import client
from clipcap_bench.capacity import capacity_summary
from clipcap_bench.load import SERVER_SETTINGS
from clipcap_bench.targets import TARGETS



@dataclass(frozen=True)
class Payload:
    name: str  # what --payload takes
    description: str  # for the report's header
    make: Callable[[Path, Path, int], list[Path]]  # (repository, folder to write into, count) -> files sent in turn


def _phone_jpegs(repo: Path, folder: Path, count: int) -> list[Path]:
    from clipcap_bench.photos import phone_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"phone-{seed}.jpg" for seed in range(count)]
    for seed, path in enumerate(paths):
        if not path.is_file():  # deterministic in the seed: made once
            path.write_bytes(phone_jpeg(seed=seed))
    return paths


def _sample_pngs(repo: Path, folder: Path, count: int) -> list[Path]:
    paths = sorted((repo / "samples").glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"{repo / 'samples'}: no PNG files to send")
    return paths


PAYLOADS = {p.name: p for p in (
    Payload("phone-jpeg", "12 MP phone JPEGs (4032x3024 on its side, EXIF Orientation 6, Display P3 ICC; "
                          "clipcap_bench.photos.phone_jpeg)", _phone_jpegs),
    Payload("samples-png", "the repository's samples/*.png (the first open-loop numbers)", _sample_pngs),
)}


@dataclass
class OpenLoopProfile:
    bundles: list[Path] = field(default_factory=lambda: [Path("models/shapes-demo")])  # served one at a time,
    # each alone on the machine; the first is the capacity baseline (relative paths: to the repository)
    work: Path = Path("build/bench/photo")  # .mar files, payload files and the servers' folders
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # offered requests/s, ascending
    duration_s: float = 20.0  # sending time per bundle and rate
    slo_ms: float = 1000.0  # the latency objective: capacity is the highest rate whose p99 is within it
    payload: str = "phone-jpeg"  # a PAYLOADS name
    payloads: int = 2  # distinct phone JPEGs sent in turn (samples-png: every sample)
    max_tokens: int | None = 20  # sent with every request as a form field (20 tokens, as the first numbers);
    # None: the image alone, decoded with the handler's defaults (up to the bundle's max_tokens)
    threads: int = 1  # OMP_NUM_THREADS of the worker (torch threads; onnxruntime intra-op threads follow)
    stop_after_miss: bool = True  # a bundle's rates after the first that misses the objective are not run
    start_timeout_s: float = 600.0  # TorchServe start until the worker is READY (a full-size .mar is ~1 GB)
    target_ratio: float = TARGETS.serving_capacity_ratio  # each later bundle's capacity over the first's (targets.toml)

    def validate(self) -> "OpenLoopProfile":
        if self.payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {', '.join(PAYLOADS)}, got {self.payload!r}")
        if not self.bundles:
            raise ValueError("give at least one bundle to serve")
        if not self.rates or min(self.rates) <= 0 or list(self.rates) != sorted(set(self.rates)):
            raise ValueError(f"rates must be > 0, distinct and ascending, got {self.rates}")
        if self.duration_s <= 0 or self.slo_ms <= 0 or self.payloads < 1 or self.threads < 1:
            raise ValueError("duration and objective must be > 0, payloads and threads >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        return self


def model_names(bundles: list[Path]) -> list[str]:
    """A TorchServe model name per bundle: its folder's name (characters a .mar name allows), "-2", "-3"...
    appended where folders share a name."""
    names: list[str] = []
    for bundle in bundles:
        base = re.sub(r"[^A-Za-z0-9_\-.]", "-", Path(bundle).resolve().name).lstrip("-.") or "bundle"
        name, count = base, 1
        while name in names:
            count += 1
            name = f"{base}-{count}"
        names.append(name)
    return names


def shipped_server_settings(repo: Path) -> dict:
    """The batching and worker settings of serving/model-config.yaml, which every archive here packs."""
    import yaml

    settings = yaml.safe_load((repo / "serving" / "model-config.yaml").read_text())
    handler = settings.get("handler") or {}
    return {**{k: settings[k] for k in SERVER_SETTINGS if k in settings},
            "decode_threads": handler.get("decode_threads"), "defaults": handler.get("defaults")}


def graph_weights(bundle: Path) -> str:
    """An export bundle's encoder and decoder weights as its manifest records them ("encoder fp32, decoder
    int8"); a model bundle's: "torch fp32". Two int8 siblings share a kind; this tells them apart."""
    from clipcap.formats.export_bundle import MANIFEST_FILE, load_manifest
    from clipcap.formats.model_bundle import load_config

    if not (bundle / MANIFEST_FILE).is_file():
        return "torch fp32"
    graphs = load_manifest(bundle, load_config(bundle)).graphs
    return ", ".join(f"{name} {(graphs[name].quantization or {}).get('weights', 'fp32')}"
                     for name in ("encoder", "decoder") if name in graphs)


def probe(url: str, model: str, key: str, body: tuple[bytes, str], timeout_s: float = 120.0) -> dict:
    """One request, alone: its answer's token count and handler stage times (what each open-loop request costs)."""
    status, answer, latency_ms = client.probe(f"{url}/predictions/{model}", key, body, timeout_s)
    if status != 200:
        raise RuntimeError(f"model {model!r}: the probe request answered {status}: "
                           f"{answer[:300].decode(errors='replace')}")
    answer = json.loads(answer)
    return {"tokens": len(answer["token_ids"]), "latency_ms": latency_ms, "handler_ms": answer["timings_ms"]}


def run_open_loop_profile(profile: OpenLoopProfile, repo: Path, progress: bool = True) -> dict:
    """Each bundle in turn: pack, serve alone, probe, load open-loop at each rate, stop; one report."""
    from clipcap_bench.bundles import bundle_kind
    from clipcap_bench.load import OpenLoopConfig, request_bodies, run_open_loop, with_options
    from clipcap_bench.torchserve import LocalTorchServe, packed_archive

    profile.validate()
    work = repo / profile.work
    bundles = [repo / b for b in profile.bundles]
    for bundle in bundles:
        if bundle_kind(bundle) is None:
            raise FileNotFoundError(f"{bundle}: not a model or export bundle")
    images = PAYLOADS[profile.payload].make(repo, work / "payloads", profile.payloads)
    options = {} if profile.max_tokens is None else {"max_tokens": profile.max_tokens}
    bodies = [with_options(body, options) for body in request_bodies(images)]
    reports, served = [], []
    for name, bundle in zip(model_names(bundles), bundles):
        start = time.perf_counter()
        built = packed_archive(bundle, repo, work / "model_store" / f"{name}.mar")
        mar_s = time.perf_counter() - start
        start = time.perf_counter()
        with LocalTorchServe(work / "torchserve" / name, work / "model_store", [name], repo, threads=profile.threads,
                             start_timeout_s=profile.start_timeout_s) as server:
            ready_s = time.perf_counter() - start
            probes = [probe(server.url, name, server.keys()["inference"], body) for body in bodies]
            config = OpenLoopConfig(url=server.url, models=[name], rates=profile.rates, duration_s=profile.duration_s,
                                    slo_ms=profile.slo_ms, images=images, options=options,
                                    stop_after_miss=profile.stop_after_miss)
            reports.append(run_open_loop(config, server.keys(), progress=progress))
        served.append({"model": name, "path": str(bundle), "kind": bundle_kind(bundle), "weights": graph_weights(bundle),
                       "mar_bytes": (work / "model_store" / f"{name}.mar").stat().st_size, "mar_built": built,
                       "mar_s": mar_s, "worker_ready_s": ready_s, "probes": probes})
    return _merged(reports, served, profile, repo)


def _merged(reports: list[dict], served: list[dict], profile: OpenLoopProfile, repo: Path) -> dict:
    """One report over the bundles' runs: their cells in turn, the settings they share, each bundle's
    archive and start-up, and the capacities."""
    from clipcap_bench.schema import check_report

    first = reports[0]
    cells = [cell for report in reports for cell in report["cells"]]
    settings = {**{k: v for k, v in first["settings"].items() if k != "url"}, "models": [b["model"] for b in served],
                "payload": profile.payload, "payload_description": PAYLOADS[profile.payload].description,
                "threads": profile.threads, "server": shipped_server_settings(repo), "bundles": served}
    report = {**first, "settings": settings, "cells": cells,
              "load_average": {"before": first["load_average"]["before"],
                               "after": reports[-1]["load_average"]["after"]},
              "capacity": capacity_summary(cells, settings["models"], profile.slo_ms, profile.target_ratio)}
    check_report(report)
    return report


def open_loop_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [f"# Open-loop serving load ({report['created_utc']})", "",
             f"Poisson arrivals, {settings['duration_s']:g} s of sending per rate, each request timed from its "
             f"scheduled send; latency objective {settings['slo_ms']:g} ms. Load average before/after: "
             f"{report['load_average']['before'][0]:.1f} / {report['load_average']['after'][0]:.1f}.", ""]
    if "bundles" in settings:
        server = settings["server"]
        options = ", ".join(f"{k} {v}" for k, v in settings["options"].items()) or "none (the handler's defaults)"
        lines += [f"Payload: {settings['payload_description']}, {len(settings['images'])} in turn. Each bundle alone "
                  f"on the machine behind its own TorchServe, with the shipped serving/model-config.yaml: "
                  f"{server.get('minWorkers')} worker, batchSize {server.get('batchSize')}, maxBatchDelay "
                  f"{server.get('maxBatchDelay')} ms, handler decode_threads {server.get('decode_threads')}; "
                  f"OMP_NUM_THREADS={settings['threads']}; decoding defaults {server.get('defaults')}, options sent "
                  f"with every request: {options}."
                  + (" A bundle's rates after its first miss are not run." if settings.get("stop_after_miss") else ""),
                  "", "| model | bundle | kind | weights | .mar MB | .mar build s | start to READY s | tokens per answer "
                  "| alone: latency ms |", "|---|---|---|---|---|---|---|---|---|"]
        for bundle in settings["bundles"]:
            tokens = sorted({p["tokens"] for p in bundle["probes"]})
            alone = "/".join(f"{p['latency_ms']:.0f}" for p in bundle["probes"])
            build = f"{bundle['mar_s']:.0f}" if bundle["mar_built"] else f"reused ({bundle['mar_s']:.0f} s to check)"
            lines.append(f"| {bundle['model']} | {bundle['path']} | {bundle['kind']} | {bundle['weights']} | "
                         f"{bundle['mar_bytes'] / 1e6:.0f} | "
                         f"{build} | {bundle['worker_ready_s']:.0f} | {', '.join(map(str, tokens))} | {alone} |")
        lines.append("")
    lines += ["| model | offered req/s | sent | answered 200 | p50 ms | p99 ms | within objective | send lag ms |",
              "|---|---|---|---|---|---|---|---|"]
    for cell in report["cells"]:
        latency = cell["latency_ms"]
        p50, p99 = (f"{latency[k]:.0f}" if latency else "-" for k in ("p50", "p99"))
        lines.append(f"| {cell['model']} | {cell['rate']:g} | {cell['sent']} | {cell['ok']} | {p50} | {p99} | "
                     f"{cell['within_slo']:.0%} | {cell['send_lag_ms']:.0f} |")
    lines += ["", "p99 of fewer than 100 answers is close to their maximum: read it with the `sent` column.", ""]
    if "capacity" in report:
        summary = report["capacity"]
        lines += [f"Capacity: the highest offered rate at which, as at every lower rate, every request was answered "
                  f"200 with p99 <= {summary['slo_ms']:g} ms (on the grid of rates measured). Target: "
                  f">= {summary['target_ratio']:g}x the baseline, {summary['baseline']}.", "",
                  "| model | capacity req/s | vs baseline | target |", "|---|---|---|---|"]
        for row in summary["models"]:
            rate = "below the lowest rate" if row["rate"] is None else f"{'>= ' if row['censored'] else ''}{row['rate']:g}"
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            lines.append(f"| {row['model']} | {rate} | {ratio} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


def plot_open_loop(report: dict, path: Path) -> Path:
    from clipcap_bench.report import figure_legend, log_where_spread, pyplot, save_figure

    plt = pyplot()
    figure, (latency_axis, slo_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model in dict.fromkeys(c["model"] for c in report["cells"]):
        cells = [c for c in report["cells"] if c["model"] == model and c["latency_ms"]]
        rates = [c["rate"] for c in cells]
        latency_axis.plot(rates, [c["latency_ms"]["p50"] for c in cells], "o-", label=f"{model} p50")
        latency_axis.plot(rates, [c["latency_ms"]["p99"] for c in cells], "s--", label=f"{model} p99")
        slo_axis.plot(rates, [c["within_slo"] for c in cells], "o-", label=model)
    latency_axis.axhline(report["settings"]["slo_ms"], color="gray", linewidth=0.8, linestyle=":")
    latency_axis.set(xlabel="offered requests/s", ylabel="latency, ms", title="Open-loop latency")
    log_where_spread(latency_axis, y_base=10)
    slo_axis.set(xlabel="offered requests/s", ylabel="fraction", ylim=(0, 1.05),
                 title=f"answered within {report['settings']['slo_ms']:g} ms")
    figure_legend(figure, [latency_axis, slo_axis])
    return save_figure(figure, path)


def write_open_loop_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap_bench.schema import write_outputs

    return write_outputs(report, out, "open_loop", open_loop_markdown, {"open_loop.png": plot_open_loop})
