"""TorchServe and Ray Serve side by side: one bundle, one machine, one run with the fronts interleaved.

Both servers run at once on loopback, TorchServe with one worker and Ray Serve with one replica,
the same batching (model-config.yaml). The load is open-loop (clipcap_bench.load.open_loop: Poisson
arrivals at each offered rate, sent on schedule whatever the server's pace); at each rate both
fronts are loaded in turn, the one that goes first alternating from rate to rate, so a noisy
neighbour hits both alike. Reported per front and rate: req/s answered, latency p50/p99 from the
scheduled send, the share answered within the objective; per front: the capacity (clipcap_bench.capacity:
the highest rate at which, as at every lower rate, every request was answered 200 with p99 within the
objective) and the worker's memory after the load.
"""
from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipcap_bench import client
from clipcap_bench.capacity import capacity
from clipcap_bench.load import http_sender, open_loop, request_bodies
from clipcap_bench.schema import FRONTS_SCHEMA, Envelope, check_report

FRONTS = ("torchserve", "ray-serve")


@dataclass
class FrontsConfig:
    bundle: Path  # model or export bundle served by both
    repo: Path  # the checkout: serving/handler.py, model-config.yaml, config.properties
    work_dir: Path = Path("build/bench/fronts")  # the archive and TorchServe's directory
    rates: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 40.0])  # offered req/s, Poisson arrivals
    duration_s: float = 15.0  # per front and rate
    warmup: int = 8  # requests per front first, not counted
    timeout_s: float = 120.0  # per request
    threads: int = 1  # torch threads of the worker / replica
    p99_objective_ms: float = 500.0  # the latency objective of the capacity rule (clipcap_bench.capacity)
    images: list[Path] = field(default_factory=list)  # sent in turn; none: synthetic JPEGs


def _worker_memory_mb(pids: list[int]) -> dict:
    import psutil

    processes = [psutil.Process(pid) for pid in pids]
    return {"rss_mb": sum(p.memory_info().rss for p in processes) / 2**20,
            "uss_mb": sum(p.memory_full_info().uss for p in processes) / 2**20, "processes": len(processes)}


def _ray_replica_pids() -> list[int]:
    """The embedded Ray's replica processes: this process's descendants titled ray::ServeReplica:..."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if "ServeReplica:" in " ".join(p.cmdline())]


async def _load(config: FrontsConfig, targets: dict[str, tuple[str, str]], bodies: list, progress: bool) -> dict:
    from tqdm import tqdm

    # No pool limit: an open loop sends on schedule, a queue in the client would hide the server's.
    sessions = {front: client.session(token, config.timeout_s) for front, (_, token) in targets.items()}
    results: dict[tuple[str, float], dict] = {}
    try:
        senders = {front: http_sender(sessions[front], url) for front, (url, _) in targets.items()}
        for front, (url, _) in targets.items():
            await client.warm_up(sessions[front], url, bodies, config.warmup, front)
        with tqdm(total=len(config.rates) * len(targets), desc="fronts", unit="rate", disable=not progress) as bar:
            for index, rate in enumerate(config.rates):
                for front in (list(targets) if index % 2 == 0 else list(targets)[::-1]):
                    bar.set_postfix_str(f"{front} {rate:g}/s")
                    [result] = await open_loop(senders[front], bodies, [rate], config.duration_s,
                                               config.p99_objective_ms, seed=index)
                    results[(front, rate)] = asdict(result)
                    bar.update()
    finally:
        for session in sessions.values():
            await session.close()
    return results


def compare_fronts(config: FrontsConfig, progress: bool = True) -> dict:
    """Start both fronts on `config.bundle`, load them interleaved, stop them; returns the report."""
    from clipcap_bench.torchserve import LocalTorchServe, free_ports, pack_archives
    from clipcap.serving_ray import RayServeConfig, RayServer

    serving = config.repo / "serving"
    store = config.work_dir / "model_store"
    pack_archives(store, {"clipcap": (config.bundle, None)}, config.repo, progress)
    bodies = request_bodies(config.images)
    os.environ["OMP_NUM_THREADS"] = str(config.threads)  # the Ray replica's torch threads (inherited)
    ray_config = RayServeConfig(bundle=str(config.bundle), model_config=str(serving / "model-config.yaml"),
                                port=free_ports(1)[0], replicas=1, cpus_per_replica=config.threads,
                                token=secrets.token_urlsafe(32), metrics=True)  # metrics on, as TorchServe's
    envelope = Envelope(FRONTS_SCHEMA)
    with LocalTorchServe(config.work_dir / "torchserve", store, ["clipcap"], config.repo, config.threads) as torchserve, \
            RayServer(ray_config) as ray_server:
        targets = {"torchserve": (f"{torchserve.url}/predictions/clipcap", torchserve.keys()["inference"]),
                   "ray-serve": (f"{ray_server.url}/predictions/clipcap", ray_server.token)}
        results = asyncio.run(_load(config, targets, bodies, progress))
        memory = {"torchserve": _worker_memory_mb([p.pid for p in torchserve.processes[1:]]),
                  "ray-serve": _worker_memory_mb(_ray_replica_pids())}
    cells = [{"front": front, **result, "requests_per_s": result["ok"] / result["wall_s"]}
             for (front, _), result in results.items()]
    found = capacity(cells, config.p99_objective_ms, key="front")
    capacities = {front: found[front].rate or 0.0 if front in found else 0.0 for front in FRONTS}
    report = envelope.report({**asdict(config), "images": [str(p) for p in config.images] or "4 synthetic JPEGs",
                              "load": "open-loop, Poisson arrivals"},
                             cells=cells, capacity_at_p99_objective=capacities, worker_memory=memory)
    check_report(report)
    return report


def write_outputs(report: dict, out: Path) -> list[Path]:
    """fronts.json, fronts.md (the table) and fronts.png (p50/p99 and req/s per level, both fronts)."""
    import json

    from clipcap_bench.report import figure_legend, log_where_spread, pyplot, save_figure

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    (out / "fronts.json").write_text(json.dumps(report, indent=2) + "\n")
    objective = report["settings"]["p99_objective_ms"]
    lines = [f"| front | offered req/s | answered req/s | p50 ms | p99 ms | within {objective:g} ms | not 200 |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(report["cells"], key=lambda c: (c["rate"], c["front"])):
        latency = c["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
        lines.append(f"| {c['front']} | {c['rate']:g} | {c['requests_per_s']:.1f} | {latency['p50']:.1f} | "
                     f"{latency['p99']:.1f} | {100 * c['within_slo']:.1f}% | {c['sent'] - c['ok']} |")
    lines += ["", f"capacity (the highest offered rate at which, as at every lower rate, every request was answered "
              f"200 with p99 within {objective:g} ms): " + ", ".join(
        f"{front} {value:.1f}" for front, value in report["capacity_at_p99_objective"].items()),
        "worker memory after the load (MiB, RSS / USS): " + ", ".join(
        f"{front} {m['rss_mb']:.0f} / {m['uss_mb']:.0f}" for front, m in report["worker_memory"].items())]
    (out / "fronts.md").write_text("\n".join(lines) + "\n")
    figure, (latency_axis, rate_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for front, colour in zip(FRONTS, ("tab:blue", "tab:orange")):
        cells = sorted((c for c in report["cells"] if c["front"] == front and c["latency_ms"]), key=lambda c: c["rate"])
        levels = [c["rate"] for c in cells]
        for quantile, style in (("p50", "-o"), ("p99", "--o")):
            latency_axis.plot(levels, [c["latency_ms"][quantile] for c in cells], style, color=colour,
                              label=f"{front} {quantile}")
        rate_axis.plot(levels, [c["requests_per_s"] for c in cells], "-o", color=colour, label=front)
    offered = sorted({c["rate"] for c in report["cells"]})
    rate_axis.plot(offered, offered, ":", color="grey", label="offered")
    latency_axis.axhline(objective, color="grey", linestyle=":", label=f"objective {objective:g} ms")
    latency_axis.set(xlabel="offered req/s (Poisson)", ylabel="latency from scheduled send (ms)")
    log_where_spread(latency_axis, y_base=10)
    rate_axis.set(xlabel="offered req/s (Poisson)", ylabel="answered req/s")
    for axis in (latency_axis, rate_axis):
        axis.grid(alpha=0.3)
    figure_legend(figure, [latency_axis, rate_axis])
    figure.suptitle("TorchServe vs Ray Serve: one worker / one replica, open loop, interleaved")
    save_figure(figure, out / "fronts.png")
    return [out / "fronts.json", out / "fronts.md", out / "fronts.png"]
