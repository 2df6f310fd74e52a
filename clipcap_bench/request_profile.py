"""The request profile: one caption request in process (no HTTP), 12 MP phone JPEG bytes -> caption, batch 1,
a fixed number of tokens, timed per stage (bytes -> pixels, encoder, token decoding) for several request
paths ("options") interleaved round-robin in one run: what a request cost before shrink on load and the
int8 encoder ("today") against the best options since.

Every option runs once a round in a rotating order, so a busy neighbour slows all of them alike; the
target is a ratio of two medians from the same run. Generation is fixed length (the stop token is
ignored), so every option decodes exactly `tokens` tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipcap_bench.experiment import rotation
from clipcap_bench.photos import phone_jpeg
from clipcap_bench.schema import REQUEST_SCHEMA, Envelope, check_report
from clipcap_bench.statistics import percentiles
from clipcap_bench.steps import run_steps
from clipcap_bench.targets import TARGETS
from clipcap.config import BundleError
from clipcap.runtimes import set_compute_threads

STAGES = ("pixels", "encode", "decode")  # their sum is the request's time but for a few microseconds of glue
BASELINE = "today"


@dataclass(frozen=True)
class RequestOption:
    name: str
    bundle: str  # its export bundle: a directory under RequestProfile.bundles (make_full_size_bundles' layout)
    shrink_on_load: bool  # bytes -> pixels by load_pixels (JPEG DCT scaling); False: the full decode
    what: str  # one line for the reports


OPTIONS = {option.name: option for option in (
    RequestOption("today", "onnx-int8", False, "before shrink on load: full JPEG decode, upright, crop-first "
                  "bicubic; fp32 encoder, dynamic int8 decoder"),
    RequestOption("shrink-on-load", "onnx-int8", True, "load_pixels (shrink on load); fp32 encoder, "
                  "dynamic int8 decoder"),
    RequestOption("int8-encoder", "onnx-int8-encoder", True, "load_pixels; dynamic int8 encoder and decoder"),
    RequestOption("int8-encoder-int4-wo-decoder", "onnx-int4-wo-int8-encoder", True, "load_pixels; dynamic int8 "
                  "encoder, weight-only int4 decoder"),
    RequestOption("int4-wo-decoder", "onnx-int4-wo", True, "load_pixels; fp32 encoder, weight-only int4 decoder"),
    RequestOption("int8-wo-decoder", "onnx-int8-wo", True, "load_pixels; fp32 encoder, weight-only int8 decoder"),
)}


@dataclass
class RequestProfile:
    bundles: Path  # a directory holding the options' bundles (benchmarks/request.py --make-full-size DIR builds it)
    options: list[str] = field(default_factory=lambda: list(OPTIONS))  # the first must be BASELINE
    tokens: int = 20  # tokens per caption, exactly (fixed-length greedy)
    rounds: int = 30  # measured rounds; each runs every option once, the order rotated
    warmup: int = 2  # rounds run first and not counted (sessions, caches, allocator)
    threads: int = 1  # set_compute_threads: torch's and onnxruntime's intra-op threads
    image_width: int = 4032  # the phone JPEG, stored on its side (EXIF 6) with a Display P3 profile: 12 MP
    image_height: int = 3024
    seed: int = 0

    def validate(self) -> "RequestProfile":
        if not self.options or self.options[0] != BASELINE:
            raise ValueError(f"options must start with the baseline {BASELINE!r}, got {self.options}")
        unknown = [name for name in self.options if name not in OPTIONS]
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        if len(self.options) < 2:
            raise ValueError("give the baseline and at least one option to compare it with")
        if self.tokens < 1 or self.rounds < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("tokens, rounds and threads must be >= 1, warmup >= 0")
        if self.image_width < 1 or self.image_height < 1:
            raise ValueError("the image needs at least one pixel")
        return self


def bytes_to_pixels(captioner, data: bytes, shrink_on_load: bool) -> torch.Tensor:
    """(1, 3, S, S) model input: load_pixels, or (today's path) the whole JPEG decoded upright, then the same
    crop-first bicubic preprocessing (colour management at the input size, as load_pixels does)."""
    from clipcap.images import decode_as_stored, open_image, preprocess_image

    if shrink_on_load:
        return captioner.load_pixels(data)[None]
    clip = captioner.config.clip
    upright = decode_as_stored(open_image(data)).upright()  # a full decode: the picture is the whole image
    return preprocess_image(upright, clip.image_size, clip.mean, clip.std)[None]


class StageClock:
    """Wall and calling-thread CPU milliseconds of each stage run through it. At 1 thread onnxruntime and
    Pillow work on the calling thread, so its CPU time is the whole work, less the time other jobs held
    the core: the figure that stays put on a shared machine. With more threads it leaves out the pools' work."""

    def __init__(self):
        self.wall_ms: dict[str, float] = {}
        self.cpu_ms: dict[str, float] = {}

    def run(self, stage: str, call, *args):
        wall, cpu = time.perf_counter(), time.thread_time()
        result = call(*args)
        self.cpu_ms[stage] = (time.thread_time() - cpu) * 1e3
        self.wall_ms[stage] = (time.perf_counter() - wall) * 1e3
        return result


def measure_request(captioner, data: bytes, shrink_on_load: bool, tokens: int) -> dict:
    """One request, bytes -> caption through the pieces Captioner.caption_pixels calls, each timed: wall ms
    per stage and in total, the same in thread CPU ms (`cpu_` keys), and the tokens generated."""
    from clipcap.decoding import DecodingOptions, generate

    options = DecodingOptions(max_tokens=tokens, ignore_stop=True).validate(captioner.token_limit)
    stops = captioner.config.tokenizer.stop_token_ids
    clock = StageClock()
    wall, cpu = time.perf_counter(), time.thread_time()
    pixels = clock.run("pixels", bytes_to_pixels, captioner, data, shrink_on_load)
    prefix = clock.run("encode", captioner.runtime.encode, pixels)
    token_ids = clock.run("decode", generate, captioner.runtime, prefix, options, stops, tokens)[0]
    captioner.tokenizer.decode(token_ids)  # the caption's text: part of the request, not of a stage
    clock.cpu_ms["total"] = (time.thread_time() - cpu) * 1e3
    clock.wall_ms["total"] = (time.perf_counter() - wall) * 1e3
    return {**clock.wall_ms, **{f"cpu_{stage}": ms for stage, ms in clock.cpu_ms.items()}, "tokens": len(token_ids)}


def open_options(names: list[str], bundles: Path) -> tuple[dict, dict[str, str]]:
    """({option: Captioner}, {option: why it is unavailable}); options on one bundle share its Captioner."""
    from clipcap.captioner import Captioner

    opened, unavailable, by_bundle = {}, {}, {}
    for name in names:
        path = Path(bundles) / OPTIONS[name].bundle
        try:
            if path not in by_bundle:
                by_bundle[path] = Captioner.from_path(path, backend="onnxruntime")
        except BundleError as error:
            unavailable[name] = str(error)
            continue
        opened[name] = by_bundle[path]
    return opened, unavailable


def run_request_profile(profile: RequestProfile, progress: bool = True) -> dict:
    """The whole measurement; returns the report (see `check_report`)."""
    from tqdm import tqdm

    profile.validate()
    set_compute_threads(profile.threads)
    envelope = Envelope(REQUEST_SCHEMA)
    [(opened, unavailable)] = run_steps(  # full-size bundles take seconds each to load
        [("load " + ", ".join(profile.options), lambda: open_options(profile.options, profile.bundles))],
        "options", progress)
    if BASELINE not in opened or len(opened) < 2:
        raise BundleError("the baseline and at least one other option must open: "
                          + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    for name, captioner in opened.items():
        if profile.tokens > captioner.token_limit:
            raise ValueError(f"{name}: tokens {profile.tokens} exceed what the model's positions allow "
                             f"({captioner.token_limit})")
    data = phone_jpeg(profile.image_width, profile.image_height, profile.seed)
    names = list(opened)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    with tqdm(total=(profile.warmup + profile.rounds) * len(names), desc="request", unit="request",
              disable=not progress) as bar:
        for round_index in range(profile.warmup + profile.rounds):
            for name in rotation(names, round_index):
                bar.set_postfix_str(name)
                sample = measure_request(opened[name], data, OPTIONS[name].shrink_on_load, profile.tokens)
                if sample["tokens"] != profile.tokens:
                    raise RuntimeError(f"{name}: {sample['tokens']} tokens generated, expected {profile.tokens}")
                if round_index >= profile.warmup:
                    samples[name].append(sample)
                bar.update()
    cells = [summarize_option(name, runs) for name, runs in samples.items()]
    report = envelope.report(
        {**asdict(profile), "image_bytes": len(data),
         "onnxruntime_intra_op_threads": _intra_op_threads(next(iter(opened.values())))},
        options={name: {"available": name in opened, "what": OPTIONS[name].what,
                        "path": str(Path(profile.bundles) / OPTIONS[name].bundle), "reason": unavailable.get(name)}
                 for name in profile.options},
        cells=cells)
    report["targets"] = [end_to_end_target(cells, clock) for clock in CLOCKS]
    check_report(report)
    return report


def _intra_op_threads(captioner) -> int:
    return captioner.runtime.sessions["decoder"].get_session_options().intra_op_num_threads


def summarize_option(name: str, runs: list[dict]) -> dict:
    """Per-stage and total percentiles of one option, wall (`stages_ms`) and thread CPU (`cpu_ms`), each
    stage's share of the total p50, and its tokens."""
    stages = {stage: percentiles([run[stage] for run in runs]) for stage in (*STAGES, "total")}
    cpu = {stage: percentiles([run[f"cpu_{stage}"] for run in runs]) for stage in (*STAGES, "total")}
    total = stages["total"]["p50"]
    return {"option": name, "rounds": len(runs), "tokens": runs[0]["tokens"], "stages_ms": stages, "cpu_ms": cpu,
            "shares": {stage: stages[stage]["p50"] / total for stage in STAGES}}


CLOCKS = {"stages_ms": "wall time", "cpu_ms": "thread CPU time"}  # a cell's timings: the target's, the cross-check's


def end_to_end_target(cells: list[dict], clock: str = "stages_ms", goal: float = TARGETS.request_fraction_of_today) -> dict:
    """The request target (targets.toml) on these cells by one of CLOCKS: the fastest option's total p50 over the baseline's,
    met when <= `goal`. `noise`: the ratio's standard error from both medians' own."""
    today = next(cell for cell in cells if cell["option"] == BASELINE)
    others = [cell for cell in cells if cell["option"] != BASELINE]
    if not others:
        raise ValueError("no option besides the baseline to compare")
    best = min(others, key=lambda cell: cell[clock]["total"]["p50"])
    ratio = best[clock]["total"]["p50"] / today[clock]["total"]["p50"]
    relative = math.hypot(*(_relative_error(cell[clock]["total"]) for cell in (best, today)))
    return {"target": f"end to end, 12 MP JPEG, batch 1, {today['tokens']} tokens: best option <= "
                      f"{goal:g}x {BASELINE}'s time ({CLOCKS[clock]})",
            "clock": clock, "best": best["option"], "value": ratio, "noise": ratio * relative, "goal": goal,
            "met": ratio <= goal}


def _relative_error(stats: dict) -> float:
    return stats["p50_se"] / stats["p50"] if stats["p50"] else 0.0


def request_markdown(report: dict) -> str:
    settings, load = report["settings"], report["load_average"]
    lines = [f"# Request profile ({report['created_utc']})", "",
             f"One request in process: a {settings['image_width']}x{settings['image_height']} phone JPEG "
             f"({settings['image_bytes'] / 1e6:.1f} MB, EXIF 6, Display P3) -> caption, batch 1, exactly "
             f"{settings['tokens']} tokens; p50 of {settings['rounds']} interleaved rounds (+{settings['warmup']} "
             f"warm-up), {settings['threads']} thread(s). CPU: {report['machine']['cpu']} "
             f"({', '.join(report['machine'].get('isa', [])) or 'ISA unknown'}). Load average before/after: "
             f"{load['before'][0]:.1f} / {load['after'][0]:.1f}.", "",
             "Wall ms p50 (share of the total) and, after the slash, the calling thread's CPU ms p50.", "",
             "| option | bytes -> pixels | encoder | token decoding | total | total p90 (wall) "
             "| vs today (wall / CPU) |",
             "|---|---|---|---|---|---|---|"]
    today = next(c for c in report["cells"] if c["option"] == BASELINE)
    for cell in report["cells"]:
        wall, cpu = cell["stages_ms"], cell["cpu_ms"]
        parts = [f"{wall[s]['p50']:.1f} ({cell['shares'][s]:.0%}) / {cpu[s]['p50']:.1f}" for s in STAGES]
        ratios = [cell[clock]["total"]["p50"] / today[clock]["total"]["p50"] for clock in CLOCKS]
        lines.append(f"| {cell['option']} | {' | '.join(parts)} | {wall['total']['p50']:.1f} / "
                     f"{cpu['total']['p50']:.1f} | {wall['total']['p90']:.1f} | {ratios[0]:.2f}x / {ratios[1]:.2f}x |")
    lines += [""] + [f"- `{name}`: {entry['what']}" + ("" if entry["available"] else f" (not run: {entry['reason']})")
                     for name, entry in report["options"].items()]
    lines += ["", "| target | best option | value | goal | met |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['best']} | {t['value']:.2f}x (+-{t['noise']:.2f}) | {t['goal']:g}x | "
              f"{'met' if t['met'] else 'MISSED'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot_request(report: dict, path: Path) -> Path:
    """Stacked bars of each option's per-stage p50s: wall time, and the calling thread's CPU time."""
    from clipcap_bench.report import pyplot, save_figure

    plt = pyplot()
    names = [cell["option"] for cell in report["cells"]]
    figure, axes = plt.subplots(1, len(CLOCKS), figsize=(11, 4), sharey=True)
    for axis, (clock, title) in zip(axes, CLOCKS.items()):
        bottom = [0.0] * len(names)
        for stage, label in zip(STAGES, ("bytes -> pixels", "encoder", "token decoding")):
            values = [cell[clock][stage]["p50"] for cell in report["cells"]]
            axis.bar(names, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
    axes[0].set_ylabel("p50 ms per request")
    axes[0].legend()
    figure.suptitle(f"One request: 12 MP JPEG -> {report['settings']['tokens']} tokens, batch 1, interleaved")
    return save_figure(figure, path)


def write_request_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap_bench.schema import write_outputs

    return write_outputs(report, out, "request", request_markdown, {"request.png": plot_request})
