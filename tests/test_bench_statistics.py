"""Statistics of the benchmark samples: percentiles, their standard errors, per-token flatness."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clipcap_bench.statistics import flatness, percentiles


def test_percentiles_and_flatness_on_known_values():
    stats = percentiles(list(range(1, 101)))
    assert {k: stats[k] for k in ("p50", "p90", "p99", "mean", "n", "iqr")} == {
        "p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01), "mean": 50.5, "n": 100, "iqr": 49.5}
    flat = flatness([2.0] * 66)
    assert flat["max_deviation"] == 0 and flat["trend"] == pytest.approx(0, abs=1e-9)
    spiky = flatness([3.0 if i % 7 == 0 else 1.0 for i in range(66)])  # noise spikes, no growth
    assert spiky["max_deviation"] == pytest.approx(2.0) and abs(spiky["trend"]) < 0.05
    growing = flatness([1.0 + 0.1 * i for i in range(66)])  # the no-cache shape: step i produces token i + 2
    assert growing["trend"] == pytest.approx((1 + 0.1 * 58) / (1 + 0.1 * 3) - 1)
    assert flatness([1.0] * 20) is None  # shorter than token 60



@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 1e4), min_size=1, max_size=60), st.floats(0.01, 100), st.floats(-50, 50))
def test_percentile_errors_follow_the_data(values, scale, shift):
    stats = percentiles(values)
    moved = percentiles([v * scale + shift for v in values])
    spread = max(values) - min(values)
    for p in (50, 90, 99):
        # Order statistics: never negative, at most half the range over 1.96, shift-free, scale with the data.
        assert 0 <= stats[f"p{p}_se"] <= spread / 3.92 + 1e-9
        assert moved[f"p{p}_se"] == pytest.approx(stats[f"p{p}_se"] * scale, rel=1e-6, abs=1e-6 * scale * spread + 1e-9)
    assert percentiles([values[0]] * len(values))["p50_se"] == 0


def test_median_error_matches_the_normal_theory_on_a_large_sample():
    # For a normal sample the median's standard error is sqrt(pi / 2) sigma / sqrt(n); order statistics
    # estimate it without knowing the distribution. 4000 draws: the estimate's own error is a few percent.
    sample = np.random.default_rng(0).normal(10.0, 2.0, 4000)
    assert percentiles(sample.tolist())["p50_se"] == pytest.approx(np.sqrt(np.pi / 2) * 2.0 / np.sqrt(4000), rel=0.2)


def test_ratio_table_is_the_one_source_of_ratios_metrics_and_targets():
    """Report rows, history metric names and targets all follow `clipcap_bench.ratios.RATIOS` by key:
    a display name changed in a report neither drops a metric nor turns a target into "not measured"."""
    from clipcap_bench.backends import BACKENDS
    from clipcap_bench.ratios import RATIOS
    from clipcap_bench.statistics import compute_ratios, evaluate_targets
    from clipcap_bench.targets import TARGETS

    assert len({r.key for r in RATIOS}) == len(RATIOS) and len({r.name for r in RATIOS}) == len(RATIOS)
    assert all(r.slower in BACKENDS and r.faster in BACKENDS for r in RATIOS)
    stats = {stage: {"p50": 1.0} for stage in ("end_to_end", "decode")}
    cells = [{"backend": b, "batch_size": 1, "tokens": 67, "stages_ms": {s: {"p50": time} for s in stats},
              "flatness": None} for b, time in (("torch-nocache", 100.0), ("torch", 10.0), ("onnxruntime", 5.0),
                                                ("onnxruntime-int8", 2.0))]
    rows = compute_ratios(cells)
    assert {r["key"] for r in rows} == {r.key for r in RATIOS if r.faster != "tensorrt"}
    for row in rows:
        row["name"] = "renamed"
    targets = evaluate_targets({"ratios": rows, "cells": cells, "roofline": {}})
    names = {r.key: r.name for r in RATIOS}
    expected = {f"{names[t.ratio]} >= {t.minimum:g}x" for t in TARGETS.latency.speedups}
    assert {t["target"] for t in targets} == expected
    assert all(t["met"] is not None for t in targets)
    by_title = {t["target"]: t for t in targets}
    kv = next(r for r in RATIOS if r.key == "kv-cache-e2e")
    kv_goal = next(t for t in TARGETS.latency.speedups if t.ratio == "kv-cache-e2e").minimum
    assert by_title[f"{kv.name} >= {kv_goal:g}x"]["measured"] == "10.00x"


def test_targets_are_data_and_a_bad_file_is_refused(tmp_path):
    """The goals come from targets.toml; a changed goal changes the verdict, a bad file names what is wrong."""
    from clipcap_bench.targets import TARGETS_FILE, load_targets

    text = TARGETS_FILE.read_text()
    assert load_targets().latency.flatness == 0.20
    changed = tmp_path / "targets.toml"
    changed.write_text(text.replace("flatness = 0.20", "flatness = 0.05"))
    assert load_targets(changed).latency.flatness == 0.05
    changed.write_text(text.replace('ratio = "ort-vs-torch-e2e"', 'ratio = "no-such-ratio"'))
    with pytest.raises(ValueError, match="no-such-ratio"):
        load_targets(changed)
    changed.write_text(text.replace("[request]", "[requests]"))
    with pytest.raises(ValueError, match="missing or unknown key"):
        load_targets(changed)
