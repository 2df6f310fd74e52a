"""The photo profile: bytes -> model input on photo-sized inputs, our pipeline and the anchors interleaved in
one run; a serving batch of eight 12 MP JPEGs in series and on threads; peak RSS of eight 36 MP decodes.

Every number a target compares is a ratio of two pipelines measured side by side, round after round,
in one process: on a shared machine only such ratios mean anything.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipcap_bench.experiment import rotation
from clipcap_bench.photos import CLIP_MEAN, CLIP_STD, PIPELINES, input_format, phone_jpeg, photo_inputs
from clipcap_bench.schema import PHOTO_SCHEMA, Envelope, check_report
from clipcap_bench.statistics import percentiles
from clipcap_bench.targets import TARGETS, PhotoTargets

ANCHORS = ("open_clip", "pillow-full", "simplejpeg", "pyvips")


@dataclass
class PhotoProfile:
    image_size: int = 224  # model input side (ViT-B-32's)
    iters: int = 9  # measured rounds; each runs every pipeline on every input, in a rotating order
    jpeg_repeats: int = 3  # the 12 MP JPEG's pipelines (whose ratios the targets read) run this many times a round
    warmup: int = 1  # rounds not counted
    batch_images: int = 8  # 12 MP JPEGs in the serving batch
    batch_threads: int = 2  # handler.decode_threads for the threaded batch
    batch_iters: int = 5  # serial/threaded batch pairs
    bundle: Path = Path("models/shapes-demo")  # the service the batch goes through
    memory_images: int = 8  # 36 MP JPEGs decoded at once for the peak-RSS measurement
    work: Path = Path("build/bench/photo")  # the 36 MP JPEG of the memory measurement
    seed: int = 0


def run_photo_profile(profile: PhotoProfile, repo: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    envelope = Envelope(PHOTO_SCHEMA)
    inputs = photo_inputs(profile.seed)
    pipelines = [p for p in PIPELINES.values() if p.module is None or importlib.util.find_spec(p.module)]
    plan = [(name, p) for name, data in inputs.items()
            for _ in range(profile.jpeg_repeats if name == "jpeg-12mp" else 1) for p in pipelines
            if p.formats is None or input_format(data) in p.formats]
    samples: dict[tuple[str, str], list[dict]] = {(name, p.name): [] for name, p in plan}
    failures: dict[str, str] = {}
    for round_index in tqdm(range(profile.warmup + profile.iters), desc="photo decode", unit="round",
                            disable=not progress):
        for name, pipeline in rotation(list(plan), round_index):
            if f"{name}/{pipeline.name}" in failures:
                continue
            try:
                _, stages = pipeline.run(inputs[name], profile.image_size)
            except Exception as error:  # an anchor that cannot read an input (pyvips without HEVC) is left out
                failures[f"{name}/{pipeline.name}"] = repr(error)[:200]
                continue
            if round_index >= profile.warmup:
                samples[(name, pipeline.name)].append(stages)
    cells = [{"input": name, "pipeline": pipeline, "stages_ms": {stage: percentiles([s[stage] for s in runs])
                                                                 for stage in runs[0]}}
             for (name, pipeline), runs in samples.items() if runs]
    body = {"inputs": {name: {"format": input_format(data), "bytes": len(data)} for name, data in inputs.items()},
            "cells": cells, "failures": failures, "ratios": _ratios(cells),
            "accuracy": {name: _mean_abs_levels(data, profile.image_size) for name, data in inputs.items()},
            "batch": measure_batch(profile, repo, progress),
            "memory": measure_peak_rss(profile.memory_images, 6000, 6000, profile.image_size, repo,
                                       repo / profile.work)}
    report = envelope.report(asdict(profile), **body)
    report["targets"] = _targets(report)
    check_report(report)
    return report


def _ratios(cells: list[dict]) -> list[dict]:
    """clipcap against every other pipeline on the same input: total time p50 over clipcap's p50."""
    ratios = []
    for cell in cells:
        if cell["pipeline"] == "clipcap":
            continue
        ours = next(c for c in cells if c["input"] == cell["input"] and c["pipeline"] == "clipcap")
        ratios.append({"input": cell["input"], "anchor": cell["pipeline"],
                       "speedup": cell["stages_ms"]["total"]["p50"] / ours["stages_ms"]["total"]["p50"]})
    return ratios


def _mean_abs_levels(data: bytes, image_size: int) -> float:
    """Mean |load_pixels - preprocess_image(decode_image)| in 8-bit levels: shrink on load's error."""
    from clipcap.images import decode_image, load_pixels, preprocess_image

    fast = load_pixels(data, image_size, [0.0] * 3, [1.0] * 3)
    full = preprocess_image(decode_image(data), image_size, [0.0] * 3, [1.0] * 3)
    return float(np.abs(fast - full).mean()) * 255


def measure_batch(profile: PhotoProfile, repo: Path, progress: bool = True) -> dict:
    """CaptionService.parse_batch on eight 12 MP JPEG requests, decode_threads 1 and N, pairs interleaved."""
    from tqdm import tqdm

    from clipcap.captioner import Captioner
    from clipcap.serving.config import ServingConfig
    from clipcap.serving.form import read_form
    from clipcap.serving.service import CaptionService

    captioner = Captioner.from_path(repo / profile.bundle)
    forms = [read_form({"Content-Type": "image/jpeg"}, phone_jpeg(seed=profile.seed + i))
             for i in range(profile.batch_images)]
    services = {threads: CaptionService(captioner, ServingConfig(decode_threads=threads))
                for threads in (1, profile.batch_threads)}
    times: dict[int, list[float]] = {threads: [] for threads in services}
    cpu: dict[int, list[float]] = {threads: [] for threads in services}  # CPU seconds per wall second
    for index in tqdm(range(profile.batch_iters + 1), desc="photo batch", unit="pair", disable=not progress):
        for threads in (list(services) if index % 2 else list(services)[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            parsed = services[threads].parse_batch(forms)
            elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
            if any(not hasattr(p, "pixels") for p in parsed):
                raise RuntimeError(f"a photo request was refused: {parsed}")
            if index:  # the first pair warms up
                times[threads].append(elapsed * 1e3)
                cpu[threads].append(used / elapsed)
    serial, threaded = (percentiles(times[t]) for t in services)
    # Cores this process got: ~threads on an idle machine; near 1 on a loaded one, where no thread count helps.
    cores_used = {f"x{t}": float(np.median(cpu[t])) for t in services}
    return {"images": len(rows), "threads": profile.batch_threads, "cpu_count": os.cpu_count(),
            "serial_ms": serial, "threaded_ms": threaded, "fraction": threaded["p50"] / serial["p50"],
            "cores_used": cores_used}


PEAK_SCRIPT = """
import sys
from clipcap_bench.photo_profile import concurrent_decode_peak
print(concurrent_decode_peak(sys.argv[1], *map(int, sys.argv[2:])))
"""


def peak_rss_growth(path: Path, count: int, image_size: int, full: bool, repo: Path) -> int:
    """Peak RSS growth of a fresh process while `count` threads turn the image file at `path` into model
    input at once (`full`: through the full decode), beyond what it held before."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(count), str(image_size), str(int(full))],
                            cwd=repo, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)},
                            timeout=600, check=True)
    return int(result.stdout.split()[-1])


def measure_peak_rss(count: int, width: int, height: int, image_size: int, repo: Path, work: Path) -> dict:
    """Peak RSS growth of `count` photo-like JPEGs of width x height decoded at once (load_pixels and the
    full decode), and the bound `memory_bound` states."""
    if not Path("/proc/self/clear_refs").exists():
        return {"measured": False, "reason": "needs Linux /proc peak-RSS reset"}
    path = write_photo_jpeg(work / f"photo-{width}x{height}.jpg", width, height)
    measured = {("full_decode" if full else "load_pixels"): peak_rss_growth(path, count, image_size, full, repo)
                for full in (False, True)}
    return {"measured": True, "images": count, "width": width, "height": height,
            "peak_rss_growth_bytes": measured, "bound_bytes": memory_bound(count, width, height)}


def write_photo_jpeg(path: Path, width: int, height: int) -> Path:
    from clipcap_bench.photos import photo_like

    path.parent.mkdir(parents=True, exist_ok=True)
    photo_like(width, height).save(path, format="JPEG", quality=90)
    return path


def memory_bound(count: int, width: int, height: int) -> int:
    """What `count` baseline JPEGs of width x height decoded at once by load_pixels may add to the peak
    RSS: each decodes at 1/8 (4 bytes a pixel in Pillow), its cut-out and resampling passes at most as
    much again twice, 4 MiB of decoder state and buffers each, and 16 MiB of allocator slack in all. (A
    progressive JPEG's decoder also keeps every DCT coefficient: up to 6 bytes a pixel at full size.)"""
    scaled = -(-width // 8) * -(-height // 8)
    return count * (3 * 4 * scaled + 4 * 2**20) + 16 * 2**20


def concurrent_decode_peak(path: str, count: int, image_size: int, full: int = 0) -> int:
    """In this process (call it in a fresh one): peak RSS growth while `count` threads each turn the
    image file at `path` into model input at once (`full`: through the full decode)."""
    from concurrent.futures import ThreadPoolExecutor

    from clipcap.images import decode_image, load_pixels, preprocess_image

    data = Path(path).read_bytes()
    mean, std = list(CLIP_MEAN), list(CLIP_STD)
    small = phone_jpeg(64, 48)
    load_pixels(small, image_size, mean, std)  # code pages and LittleCMS loaded before the measurement
    preprocess_image(decode_image(small), image_size, mean, std)

    def one(_):
        if full:
            return preprocess_image(decode_image(data), image_size, mean, std)
        return load_pixels(data, image_size, mean, std)

    with ThreadPoolExecutor(count) as pool:
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the peak (VmHWM) back to the current RSS
        list(pool.map(one, range(count)))
    return _status("VmHWM") - before


def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def _targets(report: dict, goals: PhotoTargets = TARGETS.photo) -> list[dict]:
    ratios = {(r["input"], r["anchor"]): r["speedup"] for r in report["ratios"]}
    jpeg = "jpeg-12mp"
    targets = []
    if (jpeg, "open_clip") in ratios:
        targets.append({"target": f"12 MP JPEG: clipcap >= {goals.speedup_vs_open_clip:g}x faster than open_clip's "
                                  "transform on a full decode",
                        "value": ratios[(jpeg, "open_clip")], "goal": goals.speedup_vs_open_clip,
                        "met": ratios[(jpeg, "open_clip")] >= goals.speedup_vs_open_clip})
    anchors = {a: v for (i, a), v in ratios.items() if i == jpeg and a in ANCHORS}
    if anchors:
        fastest = min(anchors, key=anchors.get)  # the smallest speedup: the anchor closest to (or faster than) us
        of_fastest = 1 / anchors[fastest]  # our time over the fastest anchor's
        targets.append({"target": f"12 MP JPEG: clipcap within {goals.of_fastest_anchor:g}x of the fastest anchor "
                                  f"({fastest})",
                        "value": of_fastest, "goal": goals.of_fastest_anchor, "met": of_fastest <= goals.of_fastest_anchor})
    batch = report["batch"]
    targets.append({"target": f"eight 12 MP JPEGs in one batch on {batch['threads']} threads <= "
                              f"{goals.batch_fraction:g}x serial ({batch['cpu_count']} cores here)",
                    "value": batch["fraction"], "goal": goals.batch_fraction,
                    "met": batch["fraction"] <= goals.batch_fraction})
    memory = report["memory"]
    if memory.get("measured"):
        growth = memory["peak_rss_growth_bytes"]["load_pixels"]
        targets.append({"target": f"peak RSS of {memory['images']} x {memory['width'] * memory['height'] / 1e6:.0f} MP "
                                  "JPEGs decoding at once, under the stated bound (MB)",
                        "value": growth / 1e6, "goal": memory["bound_bytes"] / 1e6, "met": growth <= memory["bound_bytes"]})
    return targets


def photo_markdown(report: dict) -> str:
    lines = [f"# Photo profile ({report['created_utc']})", "",
             f"Model input {report['settings']['image_size']} px; p50 of {report['settings']['iters']} interleaved "
             "rounds, ms (per-stage where the pipeline has stages). Load average before/after: "
             f"{report['load_average']['before'][0]:.1f} / {report['load_average']['after'][0]:.1f}.", "",
             "| input | pipeline | decode | preprocess | total p50 | total p90 | clipcap's speedup |",
             "|---|---|---|---|---|---|---|"]
    speedups = {(r["input"], r["anchor"]): r["speedup"] for r in report["ratios"]}
    for cell in report["cells"]:
        stages = cell["stages_ms"]
        get = lambda stage: f"{stages[stage]['p50']:.1f}" if stage in stages else "-"  # noqa: E731
        speedup = speedups.get((cell["input"], cell["pipeline"]))
        lines.append(f"| {cell['input']} | {cell['pipeline']} | {get('decode')} | {get('preprocess')} | "
                     f"{stages['total']['p50']:.1f} | {stages['total']['p90']:.1f} | "
                     f"{f'{speedup:.2f}x' if speedup else '-'} |")
    lines += ["", "Shrink on load's error (mean |load_pixels - full decode|, 8-bit levels): "
              + ", ".join(f"{k} {v:.2f}" for k, v in report["accuracy"].items()), ""]
    batch = report["batch"]
    cores = batch["cores_used"]
    lines += [f"Batch of {batch['images']} 12 MP JPEGs through CaptionService.parse_batch: serial "
              f"{batch['serial_ms']['p50']:.0f} ms, {batch['threads']} threads {batch['threaded_ms']['p50']:.0f} ms "
              f"({batch['fraction']:.2f}x; {batch['cpu_count']} cores; CPU seconds per wall second, serial / "
              f"threaded: {cores['x1']:.2f} / {cores['x' + str(batch['threads'])]:.2f}).", ""]
    memory = report["memory"]
    if memory.get("measured"):
        growth = memory["peak_rss_growth_bytes"]
        lines += [f"Peak RSS growth, {memory['images']} {memory['width']}x{memory['height']} JPEGs at once: "
                  f"load_pixels {growth['load_pixels'] / 1e6:.0f} MB, full decode {growth['full_decode'] / 1e6:.0f} MB "
                  f"(bound {memory['bound_bytes'] / 1e6:.0f} MB).", ""]
    if report["failures"]:
        lines += ["Left out: " + "; ".join(f"{k}: {v}" for k, v in report["failures"].items()), ""]
    lines += ["| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']:.2f} | {t['goal']:.2f} | {'met' if t['met'] else 'MISSED'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot_photo(report: dict, path: Path) -> Path:
    from clipcap_bench.report import pyplot, save_figure

    plt = pyplot()
    inputs = list(dict.fromkeys(c["input"] for c in report["cells"]))
    pipelines = list(dict.fromkeys(c["pipeline"] for c in report["cells"]))
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(pipelines)
    for index, pipeline in enumerate(pipelines):
        values = [next((c["stages_ms"]["total"]["p50"] for c in report["cells"]
                        if c["input"] == name and c["pipeline"] == pipeline), np.nan) for name in inputs]
        axis.bar(np.arange(len(inputs)) + index * width, values, width, label=pipeline)
    axis.set_xticks(np.arange(len(inputs)) + 0.4 - width / 2, inputs)
    axis.set_ylabel("bytes -> model input, p50 ms")
    axis.set_title("Photo profile: clipcap and the anchors, one interleaved run")
    axis.legend()
    return save_figure(figure, path)


def write_photo_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap_bench.schema import write_outputs

    return write_outputs(report, out, "photo", photo_markdown, {"photo.png": plot_photo})
