"""Benchmark history: records of runs with scripted timings, the record-to-record check, the trend plots.

The runs are real runs of the harness on a tiny model, except for the clock: every encode and
decoder step advances a scripted clock by a cost proportional to the positions it processes
(with a small deterministic jitter), so the numbers, and the verdicts on them, are the same on any
machine under any load. The planted regression is the KV cache turned off in the `torch` backend
(what a scratch branch breaking the cache would do): the recomputing step processes every
position again, so the KV-cache speed-up falls from several times to ~1.
"""
import copy
import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from clipcap_bench import backends
from clipcap_bench.history import RECORD_SCHEMA, load_records, make_record, write_record
from clipcap_bench.latency import LatencyConfig, run_latency
from clipcap_bench.machine import fingerprint, machine_info
from clipcap_bench.regression import CheckConfig, compare, newest_pair
from clipcap_bench.trends import plot_trends

ROOT = Path(__file__).resolve().parent.parent
CELL = "b4 t20"
SHARED_MACHINE = CheckConfig(z=3.0, min_change=0.25, ratios_only=True)
ENCODE_MS, POSITION_MS = 3.0, 0.5  # the scripted cost of encoding one image, of one position in a decoder step
PEAKS = {"matmul_gflops": 50.0, "matmul_library": "torch", "matmul_size": 512,
         "matmul_gflops_by_library": {"torch": {512: 50.0}}, "bandwidth_gbps": 10.0, "read_gbps": 10.0,
         "copy_gbps": 8.0, "bandwidth_mb": 256, "threads": 1, "device": "cpu", "clock": "wall"}


class ScriptedClock:
    """perf_counter() that moves only when a scripted runtime works: cost x (1 + jitter of up to 4%)."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, milliseconds: float) -> None:
        self.calls += 1
        self.now += milliseconds * (1 + 0.04 * ((self.calls * 7919) % 11 - 5) / 5) / 1e3


class ScriptedRuntime:
    """A real runtime (its outputs are used) whose encode and step cost scripted time on `clock`."""

    def __init__(self, inner, clock: ScriptedClock):
        self.inner, self.clock = inner, clock
        self.config, self.device = inner.config, inner.device

    def __getattr__(self, name):  # map_embeddings, embed, new_cache, select
        return getattr(self.inner, name)

    def encode(self, pixels):
        self.clock.advance(ENCODE_MS * pixels.shape[0])
        return self.inner.encode(pixels)

    def step(self, embeds, cache):
        self.clock.advance(POSITION_MS * embeds.shape[0] * embeds.shape[1])  # (B, positions, E)
        return self.inner.step(embeds, cache)


def scripted_run(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> dict:
    import clipcap.captioner
    import clipcap.runtimes
    import clipcap_bench.latency

    clock = ScriptedClock()
    real_open = clipcap.runtimes.open_runtime
    scripted_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    with monkeypatch.context() as patch:
        patch.setattr(clipcap.runtimes, "open_runtime", lambda *a, **k: ScriptedRuntime(real_open(*a, **k), clock))
        for module in (clipcap.captioner, clipcap_bench.latency, backends):
            patch.setattr(module, "time", scripted_time)
        patch.setattr(clipcap_bench.latency, "measure_peaks", lambda device: PEAKS)
        return run_latency(config, progress=False)


@pytest.fixture(scope="module")
def records(tiny_bundle):
    """Three runs: the code as it is, the same again, and a build with the KV cache turned off."""
    config = LatencyConfig(paths=[tiny_bundle], backends=["torch", "torch-nocache"], batch_sizes=[4],
                           tokens=[20], warmup=1, iters=9, image_size=(64, 48))
    with pytest.MonkeyPatch.context() as patch:
        baseline = make_record(scripted_run(config, patch), "test", ROOT)
        rerun = make_record(scripted_run(config, patch), "test", ROOT)
        patch.setitem(backends.BACKENDS, "torch", dataclasses.replace(backends.BACKENDS["torch"], use_cache=False))
        slowed = make_record(scripted_run(config, patch), "test", ROOT)
    return baseline, rerun, slowed


def test_a_record_holds_commit_machine_cells_and_metrics_with_noise(records):
    record = records[0]
    assert record["schema"] == RECORD_SCHEMA and record["kind"] == "latency"
    assert len(record["commit"]["sha"]) == 40 and isinstance(record["commit"]["dirty"], bool)
    assert {r["machine"]["fingerprint"] for r in records} == {fingerprint(machine_info())}  # one machine, one id
    assert {(c["backend"], c["batch_size"], c["tokens"]) for c in record["cells"]} == {
        ("torch", 4, 20), ("torch-nocache", 4, 20)}
    stats = record["cells"][0]["stages_ms"]["end_to_end"]
    assert stats["n"] == 9 and stats["p50"] <= stats["p90"] <= stats["p99"] and stats["iqr"] >= 0
    for name in (f"captions/s torch {CELL}", f"ms/token torch {CELL}", f"ratio kv-cache-e2e {CELL}",
                 "roofline bandwidth torch b4"):
        metric = record["metrics"][name]
        assert metric["value"] > 0 and metric["noise"] >= 0 and metric["better"] in ("higher", "lower")
    assert record["metrics"][f"ratio kv-cache-e2e {CELL}"]["scope"] == "ratio"
    assert not record["metrics"]["roofline bandwidth torch b4"]["checked"]  # the peaks' error is unknown
    json.dumps(record)  # plain JSON


def test_the_check_flags_the_cache_turned_off(records):
    baseline, _, slowed = records
    changes = compare(baseline, slowed, SHARED_MACHINE)
    verdicts = {c.metric: c.verdict for c in changes}
    print(*changes, sep="\n")  # shown when an assertion fails
    assert verdicts[f"ratio kv-cache-e2e {CELL}"] == "regression"
    assert verdicts[f"ratio kv-cache-decode {CELL}"] == "regression"
    assert f"captions/s torch {CELL}" not in verdicts  # absolute numbers are not judged with ratios_only


def test_an_unchanged_rerun_is_not_flagged(records):
    baseline, rerun, _ = records
    changes = compare(baseline, rerun, SHARED_MACHINE)
    assert changes and [c.metric for c in changes if c.verdict == "regression"] == []


def test_check_and_trend_scripts_on_a_history(records, tmp_path):
    baseline, rerun, slowed = records
    history = tmp_path / "history"
    for index, record in enumerate((baseline, slowed)):
        record = copy.deepcopy(record)
        record["created_utc"] = f"2026-01-0{index + 1}T00:00:00+00:00"  # distinct, ordered file names
        record["commit"]["short"] = f"c{index}"
        write_record(record, history)
    command = [sys.executable, str(ROOT / "benchmarks" / "check.py"), "--records", "--history", str(history),
               "--profile", "test",
               "--kinds", "latency", "--fingerprint", baseline["machine"]["fingerprint"], "--min-change", "0.25",
               "--ratios-only"]
    result = subprocess.run(command + ["--fail-on-regression"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "**regression**" in result.stdout, result.stdout + result.stderr
    assert subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trends.py"), "--history", str(history),
                             "--profile", "test", "--out", str(tmp_path / "trends")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "trends").glob("*.png"))
    assert {p.stem for p in pngs} == {"captions_per_s", "ms_per_token", "ratios", "roofline"}
    with Image.open(pngs[0]) as image:
        assert image.format == "PNG"
    assert baseline["machine"]["fingerprint"] in (tmp_path / "trends" / "index.html").read_text()
    summary = (tmp_path / "trends" / "summary.md").read_text()
    assert f"| captions/s torch {CELL} |" in summary and "c0" in summary and "c1" in summary


# ---------------------------------------------------------------------------------------------
# The check's arithmetic on synthetic records.


def synthetic(value: float, noise: float, machine: str = "m1", created: str = "2026-01-01T00:00:00+00:00",
              scope: str = "machine", better: str = "higher") -> dict:
    metric = {"value": value, "noise": noise, "unit": "x", "better": better, "scope": scope, "family": "ratio"}
    return {"schema": RECORD_SCHEMA, "kind": "latency", "profile": "quick", "created_utc": created,
            "commit": {"short": created[:10], "dirty": False}, "machine": {"fingerprint": machine},
            "metrics": {"m": metric}}


@pytest.mark.parametrize("old, new, noise, better, verdict", [
    (10.0, 7.0, 0.5, "higher", "regression"),  # -30%, 4.2 combined errors
    (10.0, 7.0, 1.0, "higher", "within noise"),  # -30% but only 2.1 combined errors
    (10.0, 9.5, 0.01, "higher", "within noise"),  # 35 errors, but under the 10% floor
    (10.0, 13.0, 0.5, "higher", "improvement"),
    (10.0, 13.0, 0.5, "lower", "regression"),  # a time that grew
])
def test_compare_weighs_a_change_by_the_noise_and_the_floor(old, new, noise, better, verdict):
    (change,) = compare(synthetic(old, noise, better=better), synthetic(new, noise, better=better), CheckConfig())
    assert change.verdict == verdict and change.noise == pytest.approx(noise * 2 ** 0.5)


def test_unchecked_metrics_are_not_judged():
    old, new = synthetic(10, 0.1), synthetic(1, 0.1)
    new["metrics"]["m"]["checked"] = False
    assert compare(old, new) == []


def test_ratios_only_leaves_absolute_numbers_out():
    assert compare(synthetic(10, 0.1), synthetic(5, 0.1), CheckConfig(ratios_only=True)) == []
    (change,) = compare(synthetic(10, 0.1, scope="ratio"), synthetic(5, 0.1, scope="ratio"),
                        CheckConfig(ratios_only=True))
    assert change.verdict == "regression"


def test_absolute_numbers_stay_on_their_machine_ratios_travel():
    assert compare(synthetic(10, 0.1, "m1"), synthetic(5, 0.1, "m2")) == []
    (change,) = compare(synthetic(10, 0.1, "m1", scope="ratio"), synthetic(5, 0.1, "m2", scope="ratio"))
    assert change.verdict == "regression"


def test_newest_pair_and_append_only_files(tmp_path):
    first = synthetic(1, 0, "m1", "2026-01-01T00:00:00+00:00")
    other = synthetic(1, 0, "m2", "2026-01-02T00:00:00+00:00", scope="ratio")
    last = synthetic(1, 0, "m1", "2026-01-03T00:00:00+00:00")
    assert newest_pair([first, other, last], "m1", "latency", "quick") == (first, last)
    assert newest_pair([first, other], "m2", "latency", "quick") == (first, other)  # another machine: ratios
    assert newest_pair([first], "m9", "latency", "quick") == (None, None)
    later_elsewhere = synthetic(1, 0, "m2", "2026-01-05T00:00:00+00:00", scope="ratio")
    assert newest_pair([first, later_elsewhere], "m1", "latency", "quick") == (None, first)  # never a later record
    for record in (first, last):
        record["commit"]["short"], record["kind"] = "abc1234", "latency"
        write_record(record, tmp_path)
    assert [r["created_utc"] for r in load_records(tmp_path)] == [first["created_utc"], last["created_utc"]]
    with pytest.raises(FileExistsError):
        write_record(first, tmp_path)


def test_trend_plots_of_one_record_one_legend_and_the_hardware_in_words(records, tmp_path, monkeypatch):
    from test_bench_latency import figures_drawn

    drawn = figures_drawn(monkeypatch)
    plot_trends([records[0]], tmp_path, profile="test")
    assert drawn and all(f["figure_legends"] == 1 and f["axis_legends"] == 0 for f in drawn)
    assert all(scales == ("linear", "linear") for f in drawn for scales in f["scales"])
    page = (tmp_path / "index.html").read_text()
    assert "logical cores" in page and "{" not in page.split("<table", 1)[1]  # words, not a dict


def test_trends_need_records_of_the_profile(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        plot_trends([synthetic(1, 0)], tmp_path, profile="full")


def test_a_record_of_the_history_does_not_make_the_tree_dirty(tmp_path):
    """A latency run writes its record just before the serving run reads the tree's state."""
    from clipcap_bench.history import HISTORY_DIR, git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "start")
    (tmp_path / HISTORY_DIR).mkdir(parents=True)
    (tmp_path / HISTORY_DIR / "record.json").write_text("{}")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "changed.py").write_text("")
    assert git_state(tmp_path)["dirty"] is True


def test_every_report_kind_is_declared_once_and_recorded_kinds_have_metrics():
    from clipcap_bench.history import METRICS
    from clipcap_bench.schema import KINDS, check_report

    assert {k.record for k in KINDS.values() if k.record} == set(METRICS)
    with pytest.raises(ValueError, match="unknown report schema"):
        check_report({"schema": "clipcap-nothing/1"})
    with pytest.raises(ValueError, match="missing key 'machine'"):
        check_report({"schema": "clipcap-fronts/1", "created_utc": "now"})
