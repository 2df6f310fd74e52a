"""TorchServe and Ray Serve side by side: one bundle, one machine, one run with the fronts interleaved.

Both servers run at once on loopback, each with one worker (TorchServe) or one replica (Ray Serve)
and the same batching (model-config.yaml); each concurrency level is sent in rounds that alternate
which front goes first, so a noisy neighbour hits both alike. The load is closed-loop: `level`
clients each send their next request when the last is answered (bench.load's block). Reported per
front and level: req/s, latency p50/p99, failures; per front: the worker's memory after the load.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from clipcap.bench.load import _block, request_bodies
from clipcap.bench.machine import machine_info
from clipcap.bench.schema import jsonable
from clipcap.bench.statistics import percentiles

FRONTS = ("torchserve", "ray-serve")


@dataclass
class FrontsConfig:
    bundle: Path  # model or export bundle served by both
    repo: Path  # the checkout: serving/handler.py, model-config.yaml, config.properties
    work_dir: Path = Path("build/bench/fronts")  # the archive and TorchServe's directory
    concurrency: list[int] = field(default_factory=lambda: [1, 8])  # closed-loop clients per level
    requests: int = 200  # per front and level, over the rounds
    rounds: int = 4  # per level; the front that goes first alternates
    duration_s: float = 60.0  # cap per front and level
    warmup: int = 8  # requests per front first, not counted
    timeout_s: float = 120.0  # per request
    threads: int = 1  # torch threads of the worker / replica
    p99_objective_ms: float = 500.0  # capacity: the highest req/s among levels whose p99 is within this
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
    import aiohttp
    from tqdm import tqdm

    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    sessions = {front: aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                             connector=aiohttp.TCPConnector(limit=max(config.concurrency)))
                for front, (_, token) in targets.items()}
    cells: dict[tuple[str, int], dict] = {}
    try:
        for front, (url, _) in targets.items():
            warm = await _block(sessions[front], url, bodies, 1, config.warmup, time.monotonic() + config.timeout_s,
                                config.timeout_s)
            if any(r["status"] != 200 for r in warm):
                raise RuntimeError(f"{front}: warm-up answered {[r['status'] for r in warm]}")
        per_round = -(-config.requests // config.rounds)
        with tqdm(total=len(config.concurrency) * config.rounds * len(targets), desc="fronts", unit="block",
                  disable=not progress) as bar:
            for level in config.concurrency:
                for round_index in range(config.rounds):
                    order = list(targets) if round_index % 2 == 0 else list(targets)[::-1]
                    for front in order:
                        cell = cells.setdefault((front, level), {"records": [], "wall_s": 0.0, "rounds": []})
                        deadline = time.monotonic() + config.duration_s - cell["wall_s"]
                        bar.set_postfix_str(f"{front} x{level}")
                        start = time.perf_counter()
                        block = await _block(sessions[front], targets[front][0], bodies, level,
                                             min(per_round, config.requests - len(cell["records"])), deadline,
                                             config.timeout_s)
                        seconds = time.perf_counter() - start
                        cell["records"] += block
                        cell["wall_s"] += seconds
                        cell["rounds"].append(sum(r["status"] == 200 for r in block) / seconds)
                        bar.update()
    finally:
        for session in sessions.values():
            await session.close()
    return cells


def compare_fronts(config: FrontsConfig, progress: bool = True) -> dict:
    """Start both fronts on `config.bundle`, load them interleaved, stop them; returns the report."""
    from clipcap.bench.torchserve import LocalTorchServe, free_ports
    from clipcap.export.mar import ArchiveConfig, build_archive
    from clipcap.serving_ray import RayServeConfig, RayServer

    serving = config.repo / "serving"
    store = config.work_dir / "model_store"
    build_archive(ArchiveConfig(bundle=config.bundle, handler=serving / "handler.py",
                                model_config=serving / "model-config.yaml", out=store / "clipcap.mar"))
    bodies = request_bodies(config.images)
    os.environ["OMP_NUM_THREADS"] = str(config.threads)  # the Ray replica's torch threads (inherited)
    ray_config = RayServeConfig(bundle=str(config.bundle), model_config=str(serving / "model-config.yaml"),
                                port=free_ports(1)[0], replicas=1, cpus_per_replica=config.threads,
                                token=secrets.token_urlsafe(32))
    load_before = os.getloadavg()
    with LocalTorchServe(config.work_dir / "torchserve", store, ["clipcap"], config.repo, config.threads) as torchserve, \
            RayServer(ray_config) as ray_server:
        targets = {"torchserve": (f"{torchserve.url}/predictions/clipcap", torchserve.keys()["inference"]),
                   "ray-serve": (f"{ray_server.url}/predictions/clipcap", ray_server.token)}
        results = asyncio.run(_load(config, targets, bodies, progress))
        memory = {"torchserve": _worker_memory_mb([p.pid for p in torchserve.processes[1:]]),
                  "ray-serve": _worker_memory_mb(_ray_replica_pids())}
    cells = []
    for (front, level), result in results.items():
        ok = [r for r in result["records"] if r["status"] == 200]
        statuses: dict[str, int] = {}
        for record in result["records"]:
            statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
        cells.append({"front": front, "concurrency": level, "sent": len(result["records"]), "ok": len(ok),
                      "statuses": statuses, "requests_per_s": len(ok) / result["wall_s"],
                      "requests_per_s_rounds": result["rounds"],
                      "latency_ms": percentiles([r["latency_ms"] for r in ok]) if ok else None})
    capacity = {front: max([c["requests_per_s"] for c in cells if c["front"] == front and c["latency_ms"]
                            and c["latency_ms"]["p99"] <= config.p99_objective_ms], default=0.0) for front in FRONTS}
    return {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "settings": jsonable({**asdict(config), "images": [str(p) for p in config.images] or "4 synthetic JPEGs",
                                  "load": "closed-loop"}),
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "cells": cells, "capacity_at_p99_objective": capacity, "worker_memory": memory}


def write_outputs(report: dict, out: Path) -> list[Path]:
    """fronts.json, fronts.md (the table) and fronts.png (p50/p99 and req/s per level, both fronts)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "fronts.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| front | clients | req/s | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    for c in sorted(report["cells"], key=lambda c: (c["concurrency"], c["front"])):
        latency = c["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
        lines.append(f"| {c['front']} | {c['concurrency']} | {c['requests_per_s']:.1f} | {latency['p50']:.1f} | "
                     f"{latency['p99']:.1f} | {c['sent'] - c['ok']} |")
    objective = report["settings"]["p99_objective_ms"]
    lines += ["", f"capacity at p99 <= {objective:g} ms (req/s): " + ", ".join(
        f"{front} {value:.1f}" for front, value in report["capacity_at_p99_objective"].items()),
        "worker memory after the load (MiB, RSS / USS): " + ", ".join(
        f"{front} {m['rss_mb']:.0f} / {m['uss_mb']:.0f}" for front, m in report["worker_memory"].items())]
    (out / "fronts.md").write_text("\n".join(lines) + "\n")
    figure, (latency_axis, rate_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for front, colour in zip(FRONTS, ("tab:blue", "tab:orange")):
        cells = sorted((c for c in report["cells"] if c["front"] == front and c["latency_ms"]),
                       key=lambda c: c["concurrency"])
        levels = [c["concurrency"] for c in cells]
        for quantile, style in (("p50", "-o"), ("p99", "--o")):
            latency_axis.plot(levels, [c["latency_ms"][quantile] for c in cells], style, color=colour,
                              label=f"{front} {quantile}")
        rate_axis.plot(levels, [c["requests_per_s"] for c in cells], "-o", color=colour, label=front)
    latency_axis.set(xlabel="closed-loop clients", ylabel="latency (ms)", xscale="log", yscale="log")
    rate_axis.set(xlabel="closed-loop clients", ylabel="req/s", xscale="log")
    for axis in (latency_axis, rate_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("TorchServe vs Ray Serve: one worker / one replica, interleaved rounds")
    figure.tight_layout()
    figure.savefig(out / "fronts.png", dpi=120)
    plt.close(figure)
    return [out / "fronts.json", out / "fronts.md", out / "fronts.png"]
