"""The summary tables in benchmarks/results/ are what clipcap_bench.tables makes of the committed reports."""
import json
import shutil
from pathlib import Path

from clipcap_bench.tables import TABLES, stale_tables, write_tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_the_committed_tables_are_what_the_reports_give():
    assert stale_tables(RESULTS) == [], "run: python benchmarks/tables.py"


def test_a_changed_report_changes_its_tables(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "trends"))
    assert stale_tables(results) == []
    latency = json.loads((results / "latency.json").read_text())
    latency["cells"][0]["stages_ms"]["end_to_end"]["p50"] = 123456.0
    latency["ratios"][0]["speedup"] = 9.87
    (results / "latency.json").write_text(json.dumps(latency))
    capacity = json.loads((results / "photo-capacity" / "open_loop.json").read_text())
    capacity["capacity"]["models"][1]["rate"] = 7.5
    (results / "photo-capacity" / "open_loop.json").write_text(json.dumps(capacity))
    assert stale_tables(results) == ["latency-summary.md", "capacity.md"]
    write_tables(results)
    summary = (results / "latency-summary.md").read_text()
    assert "123456 / " in summary and "9.87x" in summary
    assert "| `onnx-int8-encoder` | 7.5 |" in (results / "capacity.md").read_text()
    assert stale_tables(results) == []


def test_the_index_names_every_report_and_the_tables_are_linked():
    index = (RESULTS / "index.md").read_text()
    reports = [p for p in RESULTS.rglob("*.json") if "created_utc" in json.loads(p.read_text())]
    assert reports and all(f"[{p.relative_to(RESULTS).as_posix()}]" in index for p in reports)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert all(f"results/{name}" in readme for name in TABLES)
