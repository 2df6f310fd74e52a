"""The scheduler profile's bookkeeping (clipcap_bench.engine_profile): scripted outcomes, and one short run of
both arms on the tiny bundle whose report must pass the schema check. No timing is asserted."""
from __future__ import annotations

from clipcap_bench.engine_profile import (EngineProfileConfig, Outcome, Workload, arrivals, capacity, engine_markdown,
                                          run_engine_profile, summarize)
from clipcap_bench.schema import check_report


def test_summary_counts_the_slo_and_goodput():
    outcomes = [Outcome(0.0, first_token_s=0.1, end_s=0.5, tokens=5), Outcome(0.0, end_s=2.0, tokens=3),
                Outcome(0.0, end_s=0.2, status=503)]
    cell = summarize(outcomes, rate=3.0, duration_s=10.0)
    assert (cell["requests"], cell["errors"]) == (3, 1)
    assert cell["within_slo"] == 1 / 3 and cell["goodput_rps"] == 0.1
    assert cell["ttft_p50_ms"] == (100.0 + 2000.0) / 2  # the static arm's first text comes with its last
    assert cell["tpot_p50_ms"] == 100.0  # (500 - 100) ms over the 4 tokens after the first


def test_capacity_is_the_last_rate_before_the_first_miss():
    cells = [{"rate": r, "within_slo": w, "errors": e} for r, w, e in
             ((1, 1.0, 0), (2, 0.995, 0), (4, 0.98, 0), (8, 1.0, 0))]
    assert capacity(cells) == 2  # 4 misses; 8 meeting it again does not count
    assert capacity([{"rate": 1, "within_slo": 1.0, "errors": 1}]) == 0


def test_arrivals_follow_the_workload():
    images = {"small": [b"s"], "photo": [b"p"]}
    schedule = arrivals(50.0, 20.0, images, Workload(beam_share=0.25, photo_share=0.5), seed=1)
    assert 800 < len(schedule) < 1200 and all(0 <= a.at_s < 20 for a in schedule)
    beams = sum(a.options.strategy == "beam" for a in schedule) / len(schedule)
    photos = sum(a.image == b"p" for a in schedule) / len(schedule)
    assert 0.18 < beams < 0.32 and 0.42 < photos < 0.58
    assert schedule == arrivals(50.0, 20.0, images, Workload(beam_share=0.25, photo_share=0.5), seed=1)


def test_a_short_run_of_both_arms_makes_a_checked_report(tiny_bundle):
    report = run_engine_profile(EngineProfileConfig(bundle=str(tiny_bundle), rates=[4.0], duration_s=1.0,
                                                    unloaded_rounds=2), progress=False)
    check_report(report)
    assert {c["arm"] for c in report["cells"]} == {"static", "engine"}
    assert all(c["errors"] == 0 for c in report["cells"])
    assert "Capacity at the SLO" in engine_markdown(report)
