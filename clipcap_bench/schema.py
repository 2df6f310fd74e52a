"""The report envelope every benchmark report starts with, the report kinds' JSON schemas (a check naming the
first wrong key), and the writer."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable


LATENCY_SCHEMA = "clipcap-latency/1"
SERVING_SCHEMA = "clipcap-serving/1"
PHOTO_SCHEMA = "clipcap-photo/1"  # clipcap_bench.photo_profile
OPEN_LOOP_SCHEMA = "clipcap-open-loop/1"  # clipcap_bench.load.run_open_loop
REQUEST_SCHEMA = "clipcap-request/1"  # clipcap_bench.request_profile
ENCODER_SCHEMA = "clipcap-encoder/1"  # clipcap_bench.encoder
FRONTS_SCHEMA = "clipcap-fronts/1"  # clipcap_bench.fronts
ENGINE_SCHEMA = "clipcap-engine/1"  # clipcap_bench.engine_profile
COLD_START_SCHEMA = "clipcap-cold-start/1"  # clipcap_bench.cold_start
VLLM_PEER_SCHEMA = "clipcap-vllm-peer/1"  # clipcap_bench.serving_peers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Envelope:
    """What every report starts with: its schema, when it was measured, on what machine, with which settings,
    under what load. Made when a run starts (the load average before it); `report` closes it."""
    schema: str  # the report kind (one of the *_SCHEMA names)
    device: str = "cpu"  # the device whose GPU the machine record names
    created_utc: str = field(default_factory=_now)  # when the run started, UTC
    load_before: list[float] = field(default_factory=lambda: list(os.getloadavg()))  # 1/5/15-minute load average

    def report(self, settings: dict, **body: Any) -> dict:
        """The report: the envelope's keys (the machine now, the load average before and now) and `body`."""
        from clipcap_bench.machine import machine_info

        return {"schema": self.schema, "created_utc": self.created_utc, "machine": machine_info(self.device),
                "settings": jsonable(settings),
                "load_average": {"before": self.load_before, "after": list(os.getloadavg())}, **body}


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


ENVELOPE_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict}
STATS_KEYS = {"p50": float, "p90": float, "p99": float, "mean": float, "n": int}  # statistics.percentiles


@dataclass(frozen=True)
class ReportKind:
    """One kind of report, declared once: its schema, the keys its report and cells hold beyond the envelope's,
    which of a cell's values are percentile summaries, and the history's name for it (None: never recorded).
    Its history metrics are `clipcap_bench.history.METRICS[record]`."""
    schema: str
    keys: dict[str, type]  # top-level keys besides ENVELOPE_KEYS
    cells: str  # the key of its list of cells
    cell_keys: dict[str, type]
    stats: Callable[[dict], list[dict]] = lambda cell: []  # a cell's percentile summaries (STATS_KEYS each)
    check: Callable[[dict], None] = lambda report: None  # what else must hold
    record: str | None = None  # the history's kind name


def _latency_check(report: dict) -> None:
    for index, cell in enumerate(report["cells"]):
        if len(cell["per_token_ms"]) != cell["tokens"] - 1:
            raise ValueError(f"cells[{index}].per_token_ms: {len(cell['per_token_ms'])} values for "
                             f"{cell['tokens']} tokens (expected tokens - 1)")
    for index, ratio in enumerate(report["ratios"]):
        _check_keys(ratio, {"key": str, "name": str, "slower": str, "faster": str, "stage": str, "batch_size": int,
                            "tokens": int, "speedup": float}, f"ratios[{index}]")


def _vllm_peer_check(report: dict) -> None:
    arms = {cell["arm"] for cell in report["cells"]}
    for index, target in enumerate(report["targets"]):
        _check_keys(target, {"target": str}, f"targets[{index}]")
        for key in ("ours", "peer"):
            if target[key] is not None and target[key] not in arms:
                raise ValueError(f"targets[{index}].{key}: {target[key]!r} is not an arm of the report's cells")
        if target["met"] is not None and target["met"] != (target["ours_p99_ms"] <= target["peer_p99_ms"]):
            raise ValueError(f"targets[{index}].met: {target['met']} disagrees with the p99s it compares")


KINDS = {kind.schema: kind for kind in (
    ReportKind(LATENCY_SCHEMA, {"peaks": dict, "backends": dict, "cells": list, "ratios": list, "roofline": dict,
                                "targets": list}, "cells",
               {"backend": str, "batch_size": int, "tokens": int, "iterations": int, "stages_ms": dict,
                "throughput": dict, "per_token_ms": list},
               stats=lambda cell: list(cell["stages_ms"].values()), check=_latency_check, record="latency"),
    ReportKind(SERVING_SCHEMA, {"cells": list}, "cells",
               {"model": str, "concurrency": int, "sent": int, "ok": int, "statuses": dict, "wall_s": float,
                "requests_per_s": float, "latency_ms": dict},
               stats=lambda cell: [cell["latency_ms"]], record="serving"),
    ReportKind(PHOTO_SCHEMA, {"cells": list, "ratios": list, "accuracy": dict, "batch": dict, "memory": dict,
                              "targets": list}, "cells", {"input": str, "pipeline": str, "stages_ms": dict},
               record="photo"),
    ReportKind(OPEN_LOOP_SCHEMA, {"cells": list}, "cells",
               {"model": str, "rate": float, "sent": int, "ok": int, "statuses": dict, "within_slo": float,
                "latency_ms": dict}, record="open-loop"),
    ReportKind(REQUEST_SCHEMA, {"options": dict, "cells": list, "targets": list}, "cells",
               {"option": str, "rounds": int, "tokens": int, "stages_ms": dict, "cpu_ms": dict, "shares": dict},
               stats=lambda cell: [*cell["stages_ms"].values(), *cell["cpu_ms"].values()], record="request"),
    ReportKind(ENCODER_SCHEMA, {"peaks": dict, "rows": list}, "rows",
               {"option": str, "batch_size": int, "p50_ms": float, "cpu_p50_ms": float}),
    ReportKind(FRONTS_SCHEMA, {"cells": list, "capacity_at_p99_objective": dict, "worker_memory": dict}, "cells",
               {"front": str, "rate": float, "sent": int, "ok": int, "within_slo": float}),
    ReportKind(ENGINE_SCHEMA, {"cells": list, "capacity_rps": dict, "unloaded": dict}, "cells",
               {"arm": str, "rate": float, "requests": int, "errors": int, "e2e_p50_ms": float, "e2e_p99_ms": float,
                "ttft_p50_ms": float, "within_slo": float, "goodput_rps": float}, record="engine"),
    ReportKind(COLD_START_SCHEMA, {"install_mb": dict, "extra_mb": dict, "help_s": dict, "cells": list, "targets": list},
               "cells", {"venv": str, "bundle": str, "front": str, "starts_s": list, "start_s": float,
                         "weights_mb": float}, record="cold-start"),
    ReportKind(VLLM_PEER_SCHEMA, {"cells": list, "targets": list, "servers": dict, "same_weights": dict}, "cells",
               {"arm": str, "side": str, "precision": str, "rate": float, "requests": int, "errors": int,
                "e2e_p50_ms": float, "e2e_p90_ms": float, "e2e_p99_ms": float, "cpu_cores": float},
               check=_vllm_peer_check, record="vllm-peer"),
)}


def check_report(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    kind = KINDS.get(report.get("schema"))
    if kind is None:
        raise ValueError(f"unknown report schema {report.get('schema')!r}")
    _check_keys(report, ENVELOPE_KEYS | kind.keys, "report")
    for index, cell in enumerate(report[kind.cells]):
        _check_keys(cell, kind.cell_keys, f"{kind.cells}[{index}]")
        for stat in kind.stats(cell):
            _check_keys(stat, STATS_KEYS, f"{kind.cells}[{index}]")
    kind.check(report)


def _check_keys(data: dict, keys: dict[str, type], where: str) -> None:
    for key, kind in keys.items():
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(data[key]).__name__}")


def write_json(report: dict, path: Path) -> Path:
    check_report(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def write_outputs(report: dict, out: Path, stem: str, markdown: Callable[[dict], str],
                  plots: dict[str, Callable[[dict, Path], Path]]) -> list[Path]:
    """`out`/stem.json (checked first), stem.md and one PNG per `plots` entry (file name -> plot)."""
    json_path = write_json(report, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown(report))
    return [json_path, out / f"{stem}.md", *(plot(report, out / name) for name, plot in plots.items())]
