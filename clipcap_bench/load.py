"""Bounded aiohttp load generators against TorchServe on loopback.

Closed loop (`run_serving_load`): clients sending back to back at each concurrency level; req/s and
latency per model and level. Open loop (`open_loop`, `run_open_loop`): Poisson arrivals at each
offered rate, sent on schedule whatever the server's backlog; p50/p99 and the fraction answered within
a latency objective per rate. `open_loop` takes any async sender, so other fronts reuse it.
One request that times out or loses its connection is one failed request, counted in its cell's
statuses; the run goes on.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from clipcap_bench import client
from clipcap_bench.capacity import meets_objective
from clipcap_bench.experiment import rotation
from clipcap_bench.latency import synthetic_images
from clipcap_bench.schema import OPEN_LOOP_SCHEMA, SERVING_SCHEMA, Envelope, check_report
from clipcap_bench.statistics import percentiles


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


async def _block(session, url: str, bodies: list, clients: int, count: int, deadline: float,
                 timeout_s: float) -> list[dict]:
    """`count` requests from `clients` concurrent clients (fewer if `deadline` passes): one record each.

    A request that times out (`timeout_s`) or loses its connection is recorded as failed, not raised.
    """
    import aiohttp

    records: list[dict] = []
    indices = iter(range(count))

    async def one_client() -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            data, content_type = bodies[index % len(bodies)]
            start = time.perf_counter()
            try:
                async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
                    body = await response.read()
                status, error = response.status, body[:300].decode(errors="replace")
            except asyncio.TimeoutError:  # this request only: counted as failed, the others go on
                status, error = "timeout", f"no answer within the {timeout_s:g} s request timeout"
            except aiohttp.ClientError as failure:
                status, error = "connection-error", repr(failure)[:300]
            record = {"status": status, "latency_ms": (time.perf_counter() - start) * 1e3}
            if status == 200:
                record["handler_ms"] = sum(json.loads(body).get("timings_ms", {}).values())
            elif len(records) < 3 or all(r["status"] == 200 for r in records):
                record["error"] = error
            records.append(record)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return records


SERVER_SETTINGS = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout", "deviceType")


async def _describe_models(session, config: ServingLoadConfig) -> dict:
    """Each model's batching and worker settings, from TorchServe's management API (GET /models/NAME) on a
    `client.session` holding the management key."""
    described = {}
    for model in config.models:
        async with session.get(f"{config.management_url.rstrip('/')}/models/{model}") as response:
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
    from tqdm import tqdm

    base = config.url.rstrip("/")
    results: dict[tuple[str, int], dict] = {}
    server = {}
    if config.management_url:
        async with client.session((keys or {}).get("management"), config.timeout_s) as describe_session:
            server = await _describe_models(describe_session, config)
    # One connection per client at the highest level: a pool smaller than the concurrency would queue in the client.
    async with client.session((keys or {}).get("inference"), config.timeout_s, max(config.concurrency)) as session:
        for model in config.models:
            await client.warm_up(session, f"{base}/predictions/{model}", bodies, config.warmup,
                                 f"model {model!r} at {base}")
        per_round = -(-config.requests // config.rounds)
        total = len(config.concurrency) * config.rounds * len(config.models)
        with tqdm(total=total, desc="serving load", unit="block", disable=not progress) as bar:
            for level in config.concurrency:
                for round_index in range(config.rounds):
                    for model in rotation(list(config.models), round_index):
                        cell = results.setdefault((model, level), {"records": [], "wall_s": 0.0, "rounds": []})
                        remaining = config.requests - len(cell["records"])
                        # The duration cap counts this model's own sending time at this level, over its rounds.
                        deadline = time.monotonic() + config.duration_s - cell["wall_s"]
                        bar.set_postfix_str(f"{model} x{level}")
                        start = time.perf_counter()
                        block = await _block(session, f"{base}/predictions/{model}", bodies, level,
                                             min(per_round, remaining), deadline, config.timeout_s)
                        seconds = time.perf_counter() - start
                        cell["records"] += block
                        cell["wall_s"] += seconds
                        # Each round's own rate: their spread is the run's noise on req/s.
                        cell["rounds"].append(sum(r["status"] == 200 for r in block) / seconds)
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
    envelope = Envelope(SERVING_SCHEMA)
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
                      "requests_per_s_rounds": result["rounds"],
                      "latency_ms": percentiles([r["latency_ms"] for r in ok]),
                      "handler_ms": percentiles([r["handler_ms"] for r in ok]),
                      "errors": [r["error"] for r in records if "error" in r][:3]})
    settings = {**asdict(config), "images": [str(p) for p in config.images] or "4 synthetic 640x480 JPEGs",
                "token_authorization": keys is not None, "server": server}
    report = envelope.report(settings, cells=cells)
    check_report(report)
    return report


# -- open loop: Poisson arrivals ------------------------------------------------------------------

Sender = Callable[[Any], Awaitable[Any]]  # sends one payload; returns its status (200 = answered)


@dataclass
class RateResult:
    """One offered rate of an open-loop run."""

    rate: float  # requests per second offered (Poisson arrivals)
    sent: int  # requests scheduled and sent
    ok: int  # answered with status 200
    statuses: dict[str, int]  # every status (or client-side failure) and its count
    latency_ms: dict  # percentiles of the answered requests, each timed from its scheduled send
    within_slo: float  # fraction of the sent requests answered 200 within the objective
    send_lag_ms: float  # the latest a send started after its schedule (the generator's own lag)
    wall_s: float  # from the first scheduled send to the last answer


async def open_loop(send: Sender, payloads: Sequence, rates: Sequence[float], duration_s: float,
                    slo_ms: float, seed: int = 0, drain_s: float = 120.0,
                    stop_after_miss: bool = False) -> list[RateResult]:
    """Each rate in turn for `duration_s`: requests at Poisson arrival times, each sent on schedule whether
    or not earlier ones have been answered (open loop: a slow server meets more work, not fewer sends);
    payloads in turn. Latency counts from the scheduled time, so a queue in the client counts too.
    A request still unanswered `drain_s` after the last scheduled send is cancelled ("unanswered").
    `stop_after_miss`: the rates after the first that misses the objective (`meets_objective`) are not run."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(seed)
    results = []
    for rate in rates:
        if rate <= 0:
            raise ValueError(f"rates must be > 0 requests/s, got {rate}")
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration_s * 2) + 16))
        arrivals = arrivals[arrivals < duration_s]
        records: list[tuple[Any, float, float]] = []  # (status, latency ms, send lag ms)
        start = loop.time() + 0.05

        async def one(index: int, at: float) -> None:
            scheduled = start + at
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            lag = loop.time() - scheduled
            try:
                status = await send(payloads[index % len(payloads)])
            except asyncio.CancelledError:
                records.append(("unanswered", (loop.time() - scheduled) * 1e3, lag * 1e3))
                raise
            except Exception as failure:  # this request only (timeout, lost connection): counted, the run goes on
                status = type(failure).__name__
            records.append((status, (loop.time() - scheduled) * 1e3, lag * 1e3))

        tasks = [asyncio.create_task(one(i, float(at))) for i, at in enumerate(arrivals)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall_s = loop.time() - start
        answered = [latency for status, latency, _ in records if status == 200]
        statuses: dict[str, int] = {}
        for status, _, _ in records:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        results.append(RateResult(
            rate=float(rate), sent=len(records), ok=len(answered), statuses=statuses,
            latency_ms=percentiles(answered) if answered else {},
            within_slo=sum(latency <= slo_ms for latency in answered) / max(1, len(records)),
            send_lag_ms=max((lag for _, _, lag in records), default=0.0), wall_s=wall_s))
        if stop_after_miss and not meets_objective(asdict(results[-1]), slo_ms):
            break
    return results


def http_sender(session, url: str) -> Sender:
    """A `Sender` posting (bytes, content type) payloads to `url` on a `client.session`."""
    async def send(payload: tuple[bytes, str]) -> int:
        return (await client.post(session, url, payload))[0]

    return send


@dataclass
class OpenLoopConfig:
    url: str = "http://127.0.0.1:8080"  # TorchServe's inference address; loopback only
    models: list[str] = field(default_factory=lambda: ["clipcap"])  # registered model names, in turn
    rates: list[float] = field(default_factory=lambda: [1.0, 4.0, 8.0])  # offered requests/s, Poisson
    duration_s: float = 20.0  # sending time per model and rate
    slo_ms: float = 1000.0  # the latency objective: the fraction answered within it is reported per rate
    timeout_s: float = 60.0  # per request
    warmup: int = 2  # requests per model sent one by one first, not counted
    images: list[Path] = field(default_factory=list)  # image files sent in turn; none: synthetic JPEGs
    seed: int = 0  # arrival times
    options: dict = field(default_factory=dict)  # decoding options sent with every image as multipart fields
    # (e.g. {"max_tokens": 20}); none: the image bytes alone are the body
    stop_after_miss: bool = False  # rates ascending: a model's rates after the first that misses the objective are not run

    def validate(self) -> "OpenLoopConfig":
        check_loopback(self.url)
        if not self.models or any(not m or "/" in m for m in self.models):
            raise ValueError(f"models must be TorchServe model names, got {self.models}")
        if not self.rates or min(self.rates) <= 0 or self.duration_s <= 0 or self.slo_ms <= 0 or self.timeout_s <= 0:
            raise ValueError("rates, duration, slo and timeout must be > 0")
        if self.stop_after_miss and list(self.rates) != sorted(self.rates):
            raise ValueError(f"stopping after a missed rate needs the rates in ascending order, got {self.rates}")
        return self


def with_options(body: tuple[bytes, str], options: dict, boundary: str = "clipcap-load-boundary") -> tuple[bytes, str]:
    """A (bytes, content type) image body as multipart/form-data: one text field per option, then the
    image as the file part "data" (serving/README.md's form); no options: the body unchanged."""
    if not options:
        return body
    data, content_type = body
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in options.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="image"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def _open_loop_models(config: OpenLoopConfig, keys: dict[str, str] | None, bodies: list,
                            progress: bool) -> dict[str, list[RateResult]]:
    from tqdm import tqdm

    # No connection limit: an open-loop client must never queue a request behind the pool.
    async with client.session((keys or {}).get("inference"), config.timeout_s) as session:
        results = {}
        for model in tqdm(config.models, desc="open-loop load", unit="model", disable=not progress):
            url = f"{config.url.rstrip('/')}/predictions/{model}"
            await client.warm_up(session, url, bodies, min(config.warmup, len(bodies)), f"model {model!r}")
            send = http_sender(session, url)
            results[model] = await open_loop(send, bodies, config.rates, config.duration_s, config.slo_ms,
                                             config.seed, drain_s=config.timeout_s,
                                             stop_after_miss=config.stop_after_miss)
    return results


def run_open_loop(config: OpenLoopConfig, keys: dict[str, str] | None, progress: bool = True) -> dict:
    """Open-loop Poisson load on every model at every rate; returns the report (schema clipcap-open-loop/1)."""
    config.validate()
    bodies = [with_options(body, config.options) for body in request_bodies(config.images)]
    envelope = Envelope(OPEN_LOOP_SCHEMA)
    results = asyncio.run(_open_loop_models(config, keys, bodies, progress))
    cells = [{"model": model, **asdict(result)} for model, rates in results.items() for result in rates]
    settings = {**asdict(config), "images": [str(p) for p in config.images] or "4 synthetic 640x480 JPEGs",
                "token_authorization": keys is not None}
    report = envelope.report(settings, cells=cells)
    check_report(report)
    return report
