"""Benchmark history: one small JSON record per run, kept in the repository under benchmarks/history/.

A record holds what a later reader needs to trust a number: the commit (and whether the tree was
dirty), the date, the machine (a fingerprint of its hardware, plus versions), the settings, every
cell's p50/p90/p99 and dispersion, and a flat `metrics` table: each tracked number with the noise
its own run measured (a standard error in the number's unit), which way is better, and whether it
is a ratio (comparable across machines) or an absolute (comparable on one fingerprint only).
Records are only ever added, one file each, so the history diffs and merges cleanly.
"""
from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime
from pathlib import Path

from clipcap_bench.machine import fingerprint, hardware
from clipcap_bench.schema import KINDS, check_report

RECORD_SCHEMA = "clipcap-bench-record/1"
HISTORY_DIR = Path("benchmarks/history")  # relative to the repository root



def git_state(root: Path) -> dict:
    """The commit checked out in `root`, whether the tree differs from it (changed or new files that git
    does not ignore; the history's own records do not count: a run writes one), its date and subject."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return {"sha": "unknown", "short": "unknown", "dirty": True, "date": None, "subject": "not a git checkout"}
    return {"sha": sha, "short": sha[:7], "dirty": bool(git("status", "--porcelain", "--", ".", f":(exclude){HISTORY_DIR}")),
            "date": git("show", "-s", "--format=%cI", "HEAD"), "subject": git("show", "-s", "--format=%s", "HEAD")}


def _metric(value: float, noise: float, unit: str, better: str, scope: str, family: str, checked: bool = True) -> dict:
    """`checked`: False for a number whose noise the run cannot measure (it is drawn, not judged)."""
    return {"value": value, "noise": noise, "unit": unit, "better": better, "scope": scope, "family": family,
            "checked": checked}


def _relative_error(stats: dict) -> float:
    """The p50's standard error over the p50."""
    return stats["p50_se"] / stats["p50"] if stats["p50"] else 0.0


def _dispersion(stats: dict) -> dict:
    return {k: stats[k] for k in ("p50", "p90", "p99", "iqr", "p50_se", "n") if k in stats}


def latency_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of a latency report."""
    metrics, cells = {}, []
    errors = {}
    for cell in report["cells"]:
        where = f"b{cell['batch_size']} t{cell['tokens']}"
        stages = cell["stages_ms"]
        e2e, decode = stages["end_to_end"], stages["decode"]
        errors[(cell["backend"], cell["batch_size"], cell["tokens"])] = {
            stage: _relative_error(stats) for stage, stats in stages.items()}
        throughput = cell["throughput"]["captions_per_s"]
        metrics[f"captions/s {cell['backend']} {where}"] = _metric(
            throughput, throughput * _relative_error(e2e), "captions/s", "higher", "machine", "captions_per_s")
        if "token_step" in stages:
            # Steps within one caption share its moment's load: the per-caption decode time's error is the honest one.
            step = stages["token_step"]["p50"]
            metrics[f"ms/token {cell['backend']} {where}"] = _metric(
                step, step * _relative_error(decode), "ms", "lower", "machine", "ms_per_token")
        cells.append({"backend": cell["backend"], "batch_size": cell["batch_size"], "tokens": cell["tokens"],
                      "iterations": cell["iterations"],
                      "stages_ms": {stage: _dispersion(stats) for stage, stats in stages.items()}})
    for ratio in report["ratios"]:
        where = (ratio["batch_size"], ratio["tokens"])
        slower, faster = errors[(ratio["slower"], *where)], errors[(ratio["faster"], *where)]
        relative = math.hypot(slower[ratio["stage"]], faster[ratio["stage"]])
        metrics[f"ratio {ratio['key']} b{where[0]} t{where[1]}"] = _metric(
            ratio["speedup"], ratio["speedup"] * relative, "x", "higher", "ratio", "ratio")
    for row in report["roofline"]["rows"]:
        # The step time's error only: the peaks are one best-of-5 measurement per run, whose own error
        # (a neighbour during those seconds) is unknown, so these fractions are drawn, not checked.
        relative = errors[(row["backend"], row["batch_size"], row["tokens"])]["decode"]
        for fraction in ("bandwidth_fraction", "matmul_fraction"):
            metrics[f"roofline {fraction.split('_')[0]} {row['backend']} b{row['batch_size']}"] = _metric(
                row[fraction], row[fraction] * relative, "of peak", "higher", "machine", "roofline", checked=False)
    return metrics, cells


def serving_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of a serving report."""
    metrics, cells, errors = {}, [], {}
    for cell in report["cells"]:
        where = f"{cell['model']} c{cell['concurrency']}"
        rate, rounds = cell["requests_per_s"], cell.get("requests_per_s_rounds", [])
        if len(rounds) >= 2:  # the spread of the rounds' own rates
            mean = sum(rounds) / len(rounds)
            noise = math.sqrt(sum((r - mean) ** 2 for r in rounds) / (len(rounds) - 1) / len(rounds))
        else:
            noise = rate * _relative_error(cell["latency_ms"])
        errors[(cell["model"], cell["concurrency"])] = noise / rate if rate else 0.0
        metrics[f"req/s {where}"] = _metric(rate, noise, "req/s", "higher", "machine", "serving_rps")
        latency = cell["latency_ms"]
        metrics[f"p99 ms {where}"] = _metric(latency["p99"], latency.get("p99_se", 0.0), "ms", "lower", "machine",
                                             "serving_p99")
        cells.append({"model": cell["model"], "concurrency": cell["concurrency"], "sent": cell["sent"],
                      "ok": cell["ok"], "statuses": cell["statuses"], "requests_per_s": rate,
                      "requests_per_s_rounds": rounds, "latency_ms": _dispersion(latency)})
    first = report["settings"]["models"][0]
    for cell in report["cells"]:
        base = next((c for c in report["cells"] if c["model"] == first and c["concurrency"] == cell["concurrency"]),
                    None)
        if cell["model"] == first or base is None:
            continue
        value = cell["requests_per_s"] / base["requests_per_s"]
        relative = math.hypot(errors[(cell["model"], cell["concurrency"])], errors[(first, cell["concurrency"])])
        metrics[f"ratio req/s {cell['model']} vs {first} c{cell['concurrency']}"] = _metric(
            value, value * relative, "x", "higher", "ratio", "ratio")
    return metrics, cells


def photo_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of a photo-profile report: per-pipeline times, clipcap's speedups, the
    batch's threaded fraction, shrink on load's error and the peak RSS."""
    metrics, cells, errors = {}, [], {}
    for cell in report["cells"]:
        total = cell["stages_ms"]["total"]
        errors[(cell["input"], cell["pipeline"])] = _relative_error(total)
        metrics[f"ms {cell['pipeline']} {cell['input']}"] = _metric(
            total["p50"], total["p50_se"], "ms", "lower", "machine", "photo_ms")
        cells.append({"input": cell["input"], "pipeline": cell["pipeline"],
                      "stages_ms": {stage: _dispersion(stats) for stage, stats in cell["stages_ms"].items()}})
    for ratio in report["ratios"]:
        relative = math.hypot(errors[(ratio["input"], ratio["anchor"])], errors[(ratio["input"], "clipcap")])
        metrics[f"ratio clipcap vs {ratio['anchor']} {ratio['input']}"] = _metric(
            ratio["speedup"], ratio["speedup"] * relative, "x", "higher", "ratio", "ratio")
    batch = report["batch"]
    relative = math.hypot(_relative_error(batch["serial_ms"]), _relative_error(batch["threaded_ms"]))
    metrics[f"ratio batch threaded/serial x{batch['threads']}"] = _metric(
        batch["fraction"], batch["fraction"] * relative, "x", "lower", "ratio", "ratio")
    for name, levels in report["accuracy"].items():  # deterministic: drawn, not judged
        metrics[f"levels shrink-on-load {name}"] = _metric(levels, 0.0, "levels", "lower", "ratio", "photo_error",
                                                           checked=False)
    if report["memory"].get("measured"):
        metrics["MB peak RSS concurrent JPEGs"] = _metric(
            report["memory"]["peak_rss_growth_bytes"]["load_pixels"] / 1e6, 0.0, "MB", "lower", "machine",
            "photo_rss", checked=False)
    return metrics, cells


def open_loop_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of an open-loop report: p50/p99 and the fraction within the objective per rate."""
    metrics, cells = {}, []
    for cell in report["cells"]:
        where = f"{cell['model']} {cell['rate']:g}/s"
        latency = cell["latency_ms"]
        if latency:
            metrics[f"open-loop p50 ms {where}"] = _metric(latency["p50"], latency["p50_se"], "ms", "lower",
                                                           "machine", "open_loop_p50")
            metrics[f"open-loop p99 ms {where}"] = _metric(latency["p99"], latency["p99_se"], "ms", "lower",
                                                           "machine", "open_loop_p99")
        n = max(1, cell["sent"])
        fraction = cell["within_slo"]
        metrics[f"open-loop within slo {where}"] = _metric(
            fraction, math.sqrt(max(fraction * (1 - fraction), 1 / n) / n), "of sent", "higher", "machine",
            "open_loop_slo")
        cells.append({key: cell[key] for key in ("model", "rate", "sent", "ok", "statuses", "within_slo")}
                     | {"latency_ms": _dispersion(latency) if latency else {}})
    return metrics, cells


def request_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of a request-profile report: each option's stage and total p50s, and the target's
    ratio of the best option to today's."""
    metrics, cells = {}, []
    for cell in report["cells"]:
        for stage, stats in cell["stages_ms"].items():
            metrics[f"request ms {stage} {cell['option']}"] = _metric(stats["p50"], stats["p50_se"], "ms", "lower",
                                                                      "machine", "request_ms")
        cells.append({"option": cell["option"], "rounds": cell["rounds"], "tokens": cell["tokens"],
                      "shares": cell["shares"],
                      "stages_ms": {stage: _dispersion(stats) for stage, stats in cell["stages_ms"].items()},
                      "cpu_ms": {stage: _dispersion(stats) for stage, stats in cell["cpu_ms"].items()}})
    for target in report["targets"]:
        # One name whichever option was fastest (the record's cells say which): a history compares like with like.
        clock = "" if target["clock"] == "stages_ms" else " cpu"
        metrics[f"ratio request best vs today{clock}"] = _metric(target["value"], target["noise"], "x", "lower",
                                                                 "ratio", "ratio")
    return metrics, cells


def engine_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, compact cells) of an engine-profile report: each arm's capacity at the SLO, and per arm and
    rate its end-to-end p99, time to first token p50 and goodput."""
    metrics = {f"engine capacity rps {arm}": _metric(value, 0.0, "req/s", "higher", "machine", "engine_capacity", checked=False)
               for arm, value in report["capacity_rps"].items()}
    for cell in report["cells"]:
        where = f"{cell['arm']} {cell['rate']:g}/s"
        metrics[f"engine e2e p99 ms {where}"] = _metric(cell["e2e_p99_ms"], 0.0, "ms", "lower", "machine", "e2e_p99", checked=False)
        metrics[f"engine ttft p50 ms {where}"] = _metric(cell["ttft_p50_ms"], 0.0, "ms", "lower", "machine", "ttft_p50", checked=False)
        metrics[f"engine goodput {where}"] = _metric(cell["goodput_rps"], 0.0, "req/s", "higher", "machine", "goodput", checked=False)
    return metrics, report["cells"]


def cold_start_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, cells) of a cold-start report: install sizes, `clipcap --help`, and per arm its start to first
    caption and idle USS. One run measures no noise for these: they are drawn, not judged."""
    metrics = {f"install mb {venv}": _metric(mb, 0.0, "MiB", "lower", "machine", "install_mb", checked=False)
               for venv, mb in report["install_mb"].items()}
    metrics |= {f"help s {venv}": _metric(s, 0.0, "s", "lower", "machine", "help_s", checked=False)
                for venv, s in report["help_s"].items()}
    for cell in report["cells"]:
        where = f"{cell['front']} {cell['bundle']} {cell['venv']}"
        metrics[f"start s {where}"] = _metric(cell["start_s"], 0.0, "s", "lower", "machine", "start_s", checked=False)
        if "uss_mb" in cell:
            metrics[f"idle uss mb {where}"] = _metric(cell["uss_mb"], 0.0, "MiB", "lower", "machine", "uss_mb",
                                                      checked=False)
    return metrics, report["cells"]


def vllm_peer_metrics(report: dict) -> tuple[dict, list]:
    """(metrics, cells) of a vLLM-peer report: per arm its end-to-end p50 and p99 and the cores its server used,
    and per target our p99 over vLLM's (one run measures no noise: drawn, not judged)."""
    metrics = {}
    for cell in report["cells"]:
        for stat in ("e2e_p50_ms", "e2e_p99_ms"):
            metrics[f"vllm-peer {stat.split('_')[1]} ms {cell['arm']}"] = _metric(
                cell[stat], 0.0, "ms", "lower", "machine", f"vllm_peer_{stat.split('_')[1]}", checked=False)
        metrics[f"vllm-peer cores {cell['arm']}"] = _metric(cell["cpu_cores"], 0.0, "cores", "lower", "machine",
                                                           "vllm_peer_cores", checked=False)
    for target in report["targets"]:
        if target["met"] is not None and target["peer_p99_ms"]:
            metrics[f"ratio p99 ours vs vllm {target['target']}"] = _metric(
                target["ours_p99_ms"] / target["peer_p99_ms"], 0.0, "x", "lower", "ratio", "ratio", checked=False)
    return metrics, report["cells"]


METRICS = {"latency": latency_metrics, "serving": serving_metrics, "photo": photo_metrics,
           "open-loop": open_loop_metrics, "request": request_metrics,
           "engine": engine_metrics, "cold-start": cold_start_metrics, "vllm-peer": vllm_peer_metrics}  # a recorded kind's name -> its metrics


def make_record(report: dict, profile: str, root: Path, note: str = "") -> dict:
    """A history record of a latency, serving, photo, open-loop or request report measured with the code in `root`."""
    check_report(report)
    kind = KINDS[report["schema"]].record
    if kind is None:
        raise ValueError(f"{report['schema']} reports are not recorded in the history")
    metrics, cells = METRICS[kind](report)
    machine = report["machine"]
    settings = {k: v for k, v in report["settings"].items() if k not in ("paths", "images")}
    return {"schema": RECORD_SCHEMA, "kind": kind, "profile": profile, "note": note,
            "created_utc": report["created_utc"], "commit": git_state(root),
            "machine": {"fingerprint": fingerprint(machine), "hardware": hardware(machine),
                        "versions": {k: v for k, v in machine["versions"].items() if v}, "os": machine["os"],
                        "python": machine["python"], "gpu": machine.get("gpu")},
            "settings": settings, "load_average": report["load_average"], "peaks": report.get("peaks"),
            "metrics": metrics, "cells": cells}


def record_path(record: dict, history: Path) -> Path:
    created = datetime.fromisoformat(record["created_utc"]).strftime("%Y%m%dT%H%M%SZ")
    return history / (f"{created}_{record['commit']['short']}_{record['kind']}_{record['profile']}_"
                      f"{record['machine']['fingerprint']}.json")


def write_record(record: dict, history: Path) -> Path:
    """Add `record` as a new file (never overwrites: an existing name is an error)."""
    path = record_path(record, history)
    history.mkdir(parents=True, exist_ok=True)
    with path.open("x") as file:
        file.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def load_records(history: Path) -> list[dict]:
    """Every record in `history`, oldest first (by the time it was measured)."""
    records = []
    for path in sorted(Path(history).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("schema") != RECORD_SCHEMA:
            raise ValueError(f"{path}: not a benchmark record (schema {record.get('schema')!r})")
        records.append(record)
    return sorted(records, key=lambda r: r["created_utc"])


def record_report(report: dict, profile: str, root: Path, history: Path | None = None, note: str = "") -> Path:
    """Add `report` (measured with the code in `root`) to the history in `history` (default: root's)."""
    return write_record(make_record(report, profile, root, note), history or root / HISTORY_DIR)
