"""The serving scheduler profile: today's static batches against the CaptionEngine, in one process.

Both arms get the same open-loop Poisson arrivals of a mixed workload (most requests greedy with up
to 20 tokens, some beam-5 to 67; small PNGs and 12 MP phone JPEGs), on one bundle, the same compute
threads and image-decoding threads, and no HTTP in between, so what differs is the scheduling alone:
- static: the pre-engine service. Up to `batch_size` requests within `batch_wait_ms` form a batch
  (TorchServe's batchSize / maxBatchDelay), their images decoded on `decode_threads` threads, one
  batched decode per distinct set of options, one after another; every reply waits for the batch's
  end and the next batch for this one's.
- engine: `CaptionEngine` with the shipped handler settings: images decoded as they arrive, joined
  to the running decode at the next step, each row leaving when done; tokens streamed.
Per request: time to first token (the static arm's first text comes with its last), time per output
token after the first, end to end; per arm and rate: p50/p99, the share within the SLO and goodput
(requests per second within it); capacity is the highest rate at which SLO_SHARE of requests meet
the SLO, that rate and every lower one measured.
"""
from __future__ import annotations

import io
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, field, replace

import numpy as np
import torch

from clipcap.decoding import DecodingOptions
from clipcap.runtimes import set_compute_threads

SLO_S = 1.0  # a request within one second, end to end
SLO_SHARE = 0.99  # of the requests at a rate, for that rate to count as within capacity


@dataclass(frozen=True)
class Workload:
    beam_share: float = 0.1  # beam-5 requests, up to 67 tokens; the rest greedy, up to 20
    photo_share: float = 0.2  # 12 MP phone JPEGs; the rest small PNGs
    greedy_tokens: tuple[int, int] = (8, 20)  # greedy max_tokens drawn uniformly in this range
    beam_tokens: int = 67  # the paper's entry_length


@dataclass
class Arrival:
    at_s: float  # offset from the run's start
    image: bytes
    options: DecodingOptions


@dataclass
class Outcome:
    arrival_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    status: int = 200
    strategy: str = "greedy"

    @property
    def e2e_ms(self) -> float:
        return (self.end_s - self.arrival_s) * 1e3

    @property
    def ttft_ms(self) -> float:
        return ((self.first_token_s or self.end_s) - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.tokens < 2 or self.first_token_s is None:
            return None
        return (self.end_s - self.first_token_s) * 1e3 / (self.tokens - 1)


def arrivals(rate: float, duration_s: float, images: dict[str, list[bytes]], workload: Workload, seed: int,
             ) -> list[Arrival]:
    """A Poisson process at `rate` over `duration_s`, each request's kind drawn from `workload`."""
    rng = np.random.default_rng(seed)
    out, at = [], rng.exponential(1 / rate)
    while at < duration_s:
        photo = rng.random() < workload.photo_share
        pool = images["photo" if photo else "small"]
        image = pool[int(rng.integers(len(pool)))]
        if rng.random() < workload.beam_share:
            options = DecodingOptions(strategy="beam", beam_size=5, max_tokens=workload.beam_tokens)
        else:
            options = DecodingOptions(max_tokens=int(rng.integers(workload.greedy_tokens[0], workload.greedy_tokens[1] + 1)))
        out.append(Arrival(at, image, options))
        at += rng.exponential(1 / rate)
    return out


def _drive(schedule: list[Arrival], submit) -> list[Outcome]:
    """Submit each arrival at its time (open loop: never waiting for answers); returns when all are answered."""
    outcomes = [Outcome(0.0, strategy=a.options.strategy) for a in schedule]
    done = threading.Semaphore(0)
    start = time.perf_counter()
    for index, arrival in enumerate(schedule):
        delay = start + arrival.at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outcomes[index].arrival_s = time.perf_counter()
        submit(arrival, outcomes[index], done.release)
    for _ in schedule:
        done.acquire()
    return outcomes


class StaticArm:
    """The pre-engine service: batches formed by size and wait, decoded one after another, answered at their end."""

    def __init__(self, captioner, load_pixels, batch_size: int = 8, batch_wait_ms: float = 5.0, decode_threads: int = 2):
        self.captioner, self.load_pixels = captioner, load_pixels
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_ms / 1e3
        self.pool = ThreadPoolExecutor(decode_threads)
        self.queue: list = []
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, arrival: Arrival, outcome: Outcome, finished) -> None:
        with self.condition:
            self.queue.append((arrival, outcome, finished))
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()
        self.pool.shutdown()

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.closed:
                    self.condition.wait()
                if self.closed:
                    return
                deadline = time.perf_counter() + self.batch_wait_s
                while len(self.queue) < self.batch_size and time.perf_counter() < deadline:
                    self.condition.wait(deadline - time.perf_counter())
                batch, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
            pixels = list(self.pool.map(lambda item: self.load_pixels(item[0].image), batch))
            groups = defaultdict(list)
            for index, (arrival, _, _) in enumerate(batch):
                groups[astuple(arrival.options)].append(index)
            results = {}
            for indices in groups.values():
                options = batch[indices[0]][0].options
                captions = self.captioner.caption_pixels(np.stack([pixels[i] for i in indices]), options).captions
                results.update(zip(indices, captions))
            end = time.perf_counter()
            for index, (_, outcome, finished) in enumerate(batch):
                outcome.end_s, outcome.tokens = end, len(results[index].token_ids)
                finished()


class EngineArm:
    """The CaptionEngine, tokens streamed to a listener that notes the first one."""

    def __init__(self, engine):
        self.engine = engine

    def submit(self, arrival: Arrival, outcome: Outcome, finished) -> None:
        from clipcap.serving.engine import CaptionFailed, CaptionRequest, TokenEvent

        try:
            handle = self.engine.submit(CaptionRequest(arrival.options, image=arrival.image, stream=True))
        except CaptionFailed as failure:
            outcome.status, outcome.end_s = failure.status, time.perf_counter()
            finished()
            return

        def listen(event) -> None:
            now = time.perf_counter()
            if isinstance(event, TokenEvent):
                outcome.first_token_s = outcome.first_token_s or now
                return
            outcome.end_s = now
            if isinstance(event, CaptionFailed):
                outcome.status = event.status
            else:
                outcome.tokens = len(event.token_ids)
            finished()

        handle.listen(listen)

    def close(self) -> None:
        self.engine.close()


def summarize(outcomes: list[Outcome], rate: float, duration_s: float) -> dict:
    answered = [o for o in outcomes if o.status == 200]
    e2e = np.array([o.e2e_ms for o in answered]) if answered else np.array([np.inf])
    ttft = np.array([o.ttft_ms for o in answered]) if answered else np.array([np.inf])
    tpot = np.array([t for o in answered if (t := o.tpot_ms) is not None]) if answered else np.array([])
    within = sum(1 for o in answered if o.e2e_ms <= SLO_S * 1e3)
    cell = {"rate": rate, "requests": len(outcomes), "errors": len(outcomes) - len(answered),
            "e2e_p50_ms": float(np.percentile(e2e, 50)), "e2e_p99_ms": float(np.percentile(e2e, 99)),
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "tpot_p50_ms": float(np.percentile(tpot, 50)) if tpot.size else None,
            "within_slo": within / max(1, len(outcomes)), "goodput_rps": within / duration_s}
    beams = [o.e2e_ms for o in answered if o.strategy == "beam"]
    greedy = [o.e2e_ms for o in answered if o.strategy != "beam"]
    cell["greedy_e2e_p99_ms"] = float(np.percentile(greedy, 99)) if greedy else None
    cell["beam_e2e_p99_ms"] = float(np.percentile(beams, 99)) if beams else None
    return cell


def capacity(cells: list[dict]) -> float:
    """The highest rate at which SLO_SHARE of requests met the SLO, with every lower rate meeting it too."""
    best = 0.0
    for cell in sorted(cells, key=lambda c: c["rate"]):
        if cell["within_slo"] < SLO_SHARE or cell["errors"]:
            break
        best = cell["rate"]
    return best


@dataclass
class EngineProfileConfig:
    bundle: str  # any model or export bundle
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 6.0, 8.0])  # offered requests per second
    duration_s: float = 30.0  # per arm and rate
    threads: int = 1  # compute threads (torch and onnxruntime), the same for both arms
    seed: int = 0
    unloaded_rounds: int = 20  # single requests per arm before the load
    workload: Workload = field(default_factory=Workload)


def sample_images() -> dict[str, list[bytes]]:
    """Small PNGs (the demo's shapes renders) and 12 MP phone JPEGs."""
    from clipcap_bench.photos import phone_jpeg
    from clipcap.training.shapes import generate

    small = []
    for sample in generate(8, seed=3):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        small.append(buffer.getvalue())
    return {"small": small, "photo": [phone_jpeg(seed=seed) for seed in range(2)]}


def unloaded(arms: dict, captioner, images: dict[str, list[bytes]], rounds: int) -> dict:
    """One request at a time (greedy, 20 tokens, a small PNG), arms interleaved: each arm's end-to-end p50,
    the engine's streamed first token p50, and what the first token cannot beat: one encode plus one decode
    step at batch 1 (runtime calls, p50)."""
    from clipcap_bench.experiment import rotation

    options = DecodingOptions(max_tokens=min(20, captioner.token_limit), ignore_stop=True)
    single = [Arrival(0.0, images["small"][0], options)]
    samples: dict[str, list[Outcome]] = {name: [] for name in arms}
    opened = {name: make() for name, make in arms.items()}
    try:
        for index in range(rounds):
            for name in rotation(list(opened), index):
                samples[name] += _drive(single, opened[name].submit)
    finally:
        for arm in opened.values():
            arm.close()
    runtime = captioner.runtime
    pixels = captioner.load_pixels(images["small"][0])[None]
    encode_ms, step_ms = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        prefix = runtime.encode(pixels)
        encode_ms.append((time.perf_counter() - start) * 1e3)
        logits, cache = runtime.step(prefix, runtime.new_cache(1))
        embeds = runtime.embed(logits.argmax(-1)[:, None])
        start = time.perf_counter()
        runtime.step(embeds, cache)
        step_ms.append((time.perf_counter() - start) * 1e3)
    return {**{f"{name}_e2e_p50_ms": float(np.median([o.e2e_ms for o in outcomes])) for name, outcomes in samples.items()},
            "engine_ttft_p50_ms": float(np.median([o.ttft_ms for o in samples["engine"]])),
            "encode_p50_ms": float(np.median(encode_ms)), "step_p50_ms": float(np.median(step_ms)), "rounds": rounds}


def run_engine_profile(config: EngineProfileConfig, progress: bool = True) -> dict:
    """Unloaded single requests, then each rate: both arms on the same arrivals (alternating which goes first)."""
    from tqdm import tqdm

    from clipcap.captioner import Captioner
    from clipcap.serving.config import ServingConfig
    from clipcap.serving.engine import CaptionEngine, EngineConfig
    from clipcap_bench.schema import ENGINE_SCHEMA, Envelope

    envelope = Envelope(ENGINE_SCHEMA)
    set_compute_threads(config.threads)  # torch and the onnxruntime sessions opened after this
    captioner = Captioner.from_path(config.bundle)
    handler = ServingConfig()
    images = sample_images()
    workload = replace(config.workload, beam_tokens=min(config.workload.beam_tokens, captioner.token_limit),
                       greedy_tokens=tuple(min(t, captioner.token_limit) for t in config.workload.greedy_tokens))

    def load(data: bytes):
        return captioner.load_pixels(data, handler.formats, handler.max_image_pixels)

    arms = {"static": lambda: StaticArm(captioner, load, decode_threads=handler.decode_threads),
            "engine": lambda: EngineArm(CaptionEngine(captioner, EngineConfig(
                max_rows=handler.batch_rows, encode_batch=handler.encode_batch, encode_wait_ms=handler.encode_wait_ms,
                max_queued=handler.max_queued, decode_threads=handler.decode_threads), load_pixels=load))}
    alone = unloaded(arms, captioner, images, config.unloaded_rounds)
    warm = arrivals(4.0, 2.0, images, workload, seed=999)
    cells: list[dict] = []
    with tqdm(total=len(config.rates) * len(arms), desc="engine profile", unit="run", disable=not progress) as bar:
        for index, rate in enumerate(config.rates):
            schedule = arrivals(rate, config.duration_s, images, workload, config.seed + index)
            for name in (list(arms) if index % 2 == 0 else list(reversed(arms))):
                arm = arms[name]()
                try:
                    _drive(warm, arm.submit)
                    cells.append({"arm": name, **summarize(_drive(schedule, arm.submit), rate, config.duration_s)})
                finally:
                    arm.close()
                bar.update()
    return envelope.report({**asdict(config), "slo_s": SLO_S, "slo_share": SLO_SHARE, "handler": asdict(handler)},
                           cells=cells, unloaded=alone,
                           capacity_rps={name: capacity([c for c in cells if c["arm"] == name]) for name in arms})


def engine_markdown(report: dict) -> str:
    settings, alone = report["settings"], report["unloaded"]
    lines = [f"# Scheduler profile: {settings['bundle']}", "",
             f"Open-loop Poisson arrivals, {settings['duration_s']:g} s per arm and rate, {settings['threads']} compute "
             f"thread(s); workload: {settings['workload']}; SLO: {settings['slo_share']:.0%} within "
             f"{settings['slo_s']:g} s. Load average before/after: {report['load_average']['before'][0]:.2f} / "
             f"{report['load_average']['after'][0]:.2f}.", "",
             "| arm | req/s | requests | errors | e2e p50 ms | e2e p99 ms | TTFT p50 ms | TPOT p50 ms | within SLO | goodput req/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(report["cells"], key=lambda c: (c["rate"], c["arm"])):
        tpot = "-" if c["tpot_p50_ms"] is None else f"{c['tpot_p50_ms']:.1f}"
        lines.append(f"| {c['arm']} | {c['rate']:g} | {c['requests']} | {c['errors']} | {c['e2e_p50_ms']:.0f} | "
                     f"{c['e2e_p99_ms']:.0f} | {c['ttft_p50_ms']:.0f} | {tpot} | {c['within_slo']:.1%} | "
                     f"{c['goodput_rps']:.2f} |")
    capacity_rps = report["capacity_rps"]
    lines += ["", "Capacity at the SLO: " + ", ".join(f"{arm} {value:g} req/s" for arm, value in capacity_rps.items())
              + (f" ({capacity_rps['engine'] / capacity_rps['static']:.2f}x)" if capacity_rps.get("static") else ""),
              "", f"Unloaded, one request at a time (greedy, 20 tokens, {alone['rounds']} rounds interleaved): "
              f"static e2e p50 {alone['static_e2e_p50_ms']:.1f} ms, engine {alone['engine_e2e_p50_ms']:.1f} ms "
              f"({alone['engine_e2e_p50_ms'] / alone['static_e2e_p50_ms']:.2f}x); engine first token p50 "
              f"{alone['engine_ttft_p50_ms']:.1f} ms against encode {alone['encode_p50_ms']:.1f} + one step "
              f"{alone['step_p50_ms']:.1f} + 10 ms = {alone['encode_p50_ms'] + alone['step_p50_ms'] + 10:.1f} ms.", ""]
    return "\n".join(lines)


def plot_engine(report: dict, path):
    from clipcap_bench.report import figure_legend, pyplot, save_figure

    plt = pyplot()
    figure, (latency, goodput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in report["capacity_rps"]:
        cells = sorted((c for c in report["cells"] if c["arm"] == arm), key=lambda c: c["rate"])
        rates = [c["rate"] for c in cells]
        latency.plot(rates, [c["e2e_p99_ms"] for c in cells], marker="o", label=f"{arm}")
        goodput.plot(rates, [c["goodput_rps"] for c in cells], marker="o")
    latency.axhline(report["settings"]["slo_s"] * 1e3, color="grey", linestyle=":")
    latency.set(xlabel="offered req/s", ylabel="end-to-end p99 (ms)", title="p99 by offered load")
    goodput.set(xlabel="offered req/s", ylabel="req/s within the SLO", title="goodput")
    figure_legend(figure, [latency])
    figure.suptitle(f"static batches vs CaptionEngine: {report['settings']['bundle']}")
    return save_figure(figure, path)


def write_engine_outputs(report: dict, out) -> list:
    from clipcap_bench.schema import write_outputs

    return write_outputs(report, out, "engine", engine_markdown, {"engine.png": plot_engine})
