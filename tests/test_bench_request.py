"""The request profile on tiny bundles: its report's structure, stages that add up to the request, exactly the
asked tokens from every option, and the target's verdict as a pure function."""
import json
import runpy
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from clipcap_bench.history import make_record
from clipcap_bench.request_profile import (BASELINE, STAGES, RequestProfile, end_to_end_target, run_request_profile,
                                           write_request_outputs)
from clipcap_bench.schema import check_report


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory, tiny_export):
    """The options' layout (make_full_size_bundles' names) on the tiny export: int8 decoder, int8 encoder + decoder."""
    from clipcap.export.quantize import QuantizeConfig, quantize_bundle

    root = tmp_path_factory.mktemp("request")
    quantize_bundle(QuantizeConfig(tiny_export, root / "onnx-int8"))
    quantize_bundle(QuantizeConfig(tiny_export, root / "onnx-int8-encoder", encoder=True))
    return root


@pytest.fixture(scope="module")
def report(tiny_bundles):
    profile = RequestProfile(bundles=tiny_bundles, options=[BASELINE, "shrink-on-load", "int8-encoder",
                                                             "int4-wo-decoder"],
                             tokens=20, rounds=1, warmup=0, image_width=800, image_height=600)
    return run_request_profile(profile, progress=False)


def test_report_structure_and_stages_adding_up(report):
    check_report(report)
    assert [c["option"] for c in report["cells"]] == [BASELINE, "shrink-on-load", "int8-encoder"]
    assert not report["options"]["int4-wo-decoder"]["available"]  # no such bundle: said why, the others ran
    assert "onnx-int4-wo" in report["options"]["int4-wo-decoder"]["reason"]
    for cell in report["cells"]:
        assert cell["tokens"] == 20 and cell["rounds"] == 1
        for clock in ("stages_ms", "cpu_ms"):
            stages = cell[clock]
            parts = sum(stages[s]["p50"] for s in STAGES)
            # Disjoint intervals inside the request's own: their sum never exceeds it; the rest is glue
            # (detokenising 20 ids, the clock's own calls), a small part of a request that runs two models.
            assert 0 < parts <= stages["total"]["p50"]
            assert stages["total"]["p50"] - parts <= 0.25 * stages["total"]["p50"]
        wall = cell["stages_ms"]
        assert sum(cell["shares"].values()) == pytest.approx(sum(wall[s]["p50"] for s in STAGES) / wall["total"]["p50"])
    assert [t["clock"] for t in report["targets"]] == ["stages_ms", "cpu_ms"]
    for target in report["targets"]:
        assert target["best"] != BASELINE and target["goal"] == 0.5
    assert report["machine"]["cpu"] and len(report["load_average"]["before"]) == 3


def test_outputs_and_history_record(report, tmp_path):
    written = write_request_outputs(report, tmp_path)
    assert [p.name for p in written] == ["request.json", "request.md", "request.png"]
    assert json.loads((tmp_path / "request.json").read_text())["schema"] == report["schema"]
    markdown = (tmp_path / "request.md").read_text()
    assert "| today |" in markdown and ("met" in markdown or "MISSED" in markdown)
    record = make_record(report, "test", tmp_path)
    assert record["kind"] == "request"
    assert {"ratio request best vs today", "ratio request best vs today cpu"} <= set(record["metrics"])
    assert {f"request ms {s} {BASELINE}" for s in (*STAGES, "total")} <= set(record["metrics"])


def _cell(option: str, total: float) -> dict:
    return {"option": option, "tokens": 20, "stages_ms": {"total": {"p50": total, "p50_se": 0.0}},
            "cpu_ms": {"total": {"p50": 1.0, "p50_se": 0.0}}}


@given(today=st.floats(1.0, 1e4), others=st.lists(st.floats(1.0, 1e4), min_size=1, max_size=5))
def test_target_takes_the_fastest_option_against_today(today, others):
    cells = [_cell(BASELINE, today)] + [_cell(f"option-{i}", total) for i, total in enumerate(others)]
    target = end_to_end_target(cells, "stages_ms")
    fastest = min(range(len(others)), key=others.__getitem__)
    assert target["best"] == f"option-{fastest}"
    assert target["value"] == pytest.approx(others[fastest] / today)
    assert target["met"] == (others[fastest] / today <= 0.5)


def test_target_on_its_boundary_and_without_options():
    assert end_to_end_target([_cell(BASELINE, 100.0), _cell("half", 50.0)])["met"]
    assert not end_to_end_target([_cell(BASELINE, 100.0), _cell("more", 50.1)])["met"]
    with pytest.raises(ValueError, match="no option"):
        end_to_end_target([_cell(BASELINE, 100.0)])


@pytest.mark.parametrize("options, message", [(["int8-encoder", BASELINE], "must start with the baseline"),
                                              ([BASELINE, "int2"], "unknown option"),
                                              ([BASELINE], "at least one option")])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        RequestProfile(bundles=tmp_path, options=options).validate()


def test_the_script_measures_and_writes(tiny_bundles, tmp_path, capsys):
    """benchmarks/request.py on the tiny bundles (its default input: the 12 MP phone JPEG), one round."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "request.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--bundles", str(tiny_bundles), "--options", "today,int8-encoder", "--rounds", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    assert "int8-encoder" in capsys.readouterr().out
    assert (tmp_path / "request.png").is_file()
    assert main(["--bundles", str(tmp_path / "none"), "--options", "today,int8-encoder", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
