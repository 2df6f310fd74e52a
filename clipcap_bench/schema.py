"""The JSON schema of latency and serving reports: a check naming the first wrong key, and the writer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


LATENCY_SCHEMA = "clipcap-latency/1"
SERVING_SCHEMA = "clipcap-serving/1"
PHOTO_SCHEMA = "clipcap-photo/1"  # clipcap_bench.photo_profile
OPEN_LOOP_SCHEMA = "clipcap-open-loop/1"  # clipcap_bench.load.run_open_loop
REQUEST_SCHEMA = "clipcap-request/1"  # clipcap_bench.request_profile


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


_LATENCY_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                 "peaks": dict, "backends": dict, "cells": list, "ratios": list, "roofline": dict, "targets": list}
_CELL_KEYS = {"backend": str, "batch_size": int, "tokens": int, "iterations": int, "stages_ms": dict,
              "throughput": dict, "per_token_ms": list}
_RATIO_KEYS = {"key": str, "name": str, "slower": str, "faster": str, "stage": str, "batch_size": int, "tokens": int,
               "speedup": float}
_SERVING_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                 "cells": list}
_SERVING_CELL_KEYS = {"model": str, "concurrency": int, "sent": int, "ok": int, "statuses": dict,
                      "wall_s": float, "requests_per_s": float, "latency_ms": dict}


_PHOTO_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
               "cells": list, "ratios": list, "accuracy": dict, "batch": dict, "memory": dict, "targets": list}
_OPEN_LOOP_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                   "cells": list}
_REQUEST_KEYS = {"schema": str, "created_utc": str, "machine": dict, "settings": dict, "load_average": dict,
                 "options": dict, "cells": list, "targets": list}
_REQUEST_CELL_KEYS = {"option": str, "rounds": int, "tokens": int, "stages_ms": dict, "cpu_ms": dict, "shares": dict}
_OPEN_LOOP_CELL_KEYS = {"model": str, "rate": float, "sent": int, "ok": int, "statuses": dict,
                        "within_slo": float, "latency_ms": dict}


def check_report(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    schema = report.get("schema")
    if schema == PHOTO_SCHEMA:
        _check_keys(report, _PHOTO_KEYS, "report")
        for index, cell in enumerate(report["cells"]):
            _check_keys(cell, {"input": str, "pipeline": str, "stages_ms": dict}, f"cells[{index}]")
        return
    if schema == REQUEST_SCHEMA:
        _check_keys(report, _REQUEST_KEYS, "report")
        for index, cell in enumerate(report["cells"]):
            _check_keys(cell, _REQUEST_CELL_KEYS, f"cells[{index}]")
            for stat in [*cell["stages_ms"].values(), *cell["cpu_ms"].values()]:
                _check_keys(stat, {"p50": float, "p90": float, "p99": float, "mean": float, "n": int}, f"cells[{index}]")
        return
    if schema == OPEN_LOOP_SCHEMA:
        _check_keys(report, _OPEN_LOOP_KEYS, "report")
        for index, cell in enumerate(report["cells"]):
            _check_keys(cell, _OPEN_LOOP_CELL_KEYS, f"cells[{index}]")
        return
    if schema not in (LATENCY_SCHEMA, SERVING_SCHEMA):
        raise ValueError(f"unknown report schema {schema!r}")
    latency = schema == LATENCY_SCHEMA
    _check_keys(report, _LATENCY_KEYS if latency else _SERVING_KEYS, "report")
    for index, cell in enumerate(report["cells"]):
        _check_keys(cell, _CELL_KEYS if latency else _SERVING_CELL_KEYS, f"cells[{index}]")
        stats = cell["stages_ms"].values() if latency else [cell["latency_ms"]]
        for stat in stats:
            _check_keys(stat, {"p50": float, "p90": float, "p99": float, "mean": float, "n": int}, f"cells[{index}]")
        if latency and len(cell["per_token_ms"]) != cell["tokens"] - 1:
            raise ValueError(f"cells[{index}].per_token_ms: {len(cell['per_token_ms'])} values for "
                             f"{cell['tokens']} tokens (expected tokens - 1)")
    for index, ratio in enumerate(report["ratios"] if latency else []):
        _check_keys(ratio, _RATIO_KEYS, f"ratios[{index}]")


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
