"""The cold-start profile (clipcap_bench.cold_start): a real CLI start in this virtualenv, the install sizes
it sums, and its targets judged from scripted reports. Timings are recorded, never asserted."""
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

from clipcap_bench.cold_start import (ColdStartConfig, cold_start_markdown, cold_start_targets, directory_mb,
                                      extra_sizes_mb, run_cold_start)
from clipcap_bench.history import make_record
from clipcap_bench.schema import COLD_START_SCHEMA, check_report
from clipcap_bench.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # this test's own virtualenv: an install of the project


def test_a_cli_start_makes_a_checked_report_and_record(tiny_export, tmp_path):
    config = ColdStartConfig(venvs={"full": VENV}, bundles={"demo": tiny_export}, repo=ROOT, fronts=("cli",),
                             starts=1, work_dir=tmp_path / "work")
    report = run_cold_start(config, progress=False)
    check_report(report)
    assert report["schema"] == COLD_START_SCHEMA
    [cell] = report["cells"]
    assert (cell["venv"], cell["bundle"], cell["front"], len(cell["starts_s"])) == ("full", "demo", "cli", 1)
    assert cell["weights_mb"] > 0 and "uss_mb" not in cell  # a CLI process has no idle worker to measure
    # no venv labelled "core" here: the core goals are not measured, the CLI one is judged
    judged = {t["target"].split(" <=")[0]: t["met"] for t in report["targets"]}
    assert judged["core install"] is None and judged["clipcap --help"] is None
    assert judged["caption one image, process included"] in (True, False)
    assert "| cli | demo | full |" in cold_start_markdown(report)
    record = make_record(report, "cold-start", ROOT)
    assert record["kind"] == "cold-start" and "start s cli demo full" in record["metrics"]


def test_relative_paths_are_made_absolute(monkeypatch, tmp_path):
    """TorchServe and Ray start in their own directories: a relative venv or bundle must not reach them."""
    monkeypatch.chdir(tmp_path)
    config = ColdStartConfig(venvs={"full": Path(".venv")}, bundles={"demo": Path("demo")}, repo=ROOT)
    assert config.venvs["full"] == tmp_path / ".venv" and config.bundles["demo"] == tmp_path / "demo"


def test_extra_sizes_count_the_core_closure():
    """The core's packages include numpy: the core counts at least numpy's installed files; an extra that
    the core already holds in full adds nothing."""
    numpy_mb = sum(f.locate().stat().st_size for f in metadata.distribution("numpy").files) / 2**20
    sizes = extra_sizes_mb(VENV / "bin" / "python", ("no-such-extra",))
    assert sizes["core"] >= numpy_mb > 1
    assert sizes["no-such-extra"] == 0


def test_directory_size_counts_a_hard_link_once(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 2**20)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"y" * 2**19)
    assert directory_mb(tmp_path) == pytest.approx(1.5)


def _report(core_mb: float, help_s: float, start_s: float, uss_mb: float, weights_mb: float) -> dict:
    goals = TARGETS.cold_start
    return {"install_mb": {goals.core_venv: core_mb, "full": 6000.0}, "help_s": {goals.core_venv: help_s},
            "cells": [{"venv": goals.core_venv, "bundle": goals.demo_bundle, "front": "ray-serve", "starts_s": [start_s],
                       "start_s": start_s, "weights_mb": weights_mb, "uss_mb": uss_mb, "pss_mb": uss_mb},
                      {"venv": goals.core_venv, "bundle": "full-int8", "front": "ray-serve", "starts_s": [start_s],
                       "start_s": start_s, "weights_mb": weights_mb, "uss_mb": uss_mb, "pss_mb": uss_mb}]}


def test_targets_are_judged_against_targets_toml():
    goals = TARGETS.cold_start
    met = {t["target"] + t["where"]: t["met"] for t in cold_start_targets(
        _report(goals.core_install_mb - 1, goals.help_s, goals.first_caption_demo_s, goals.idle_uss_mb + 99, 100))}
    assert all(met.values()) and len(met) == 6
    missed = cold_start_targets(_report(goals.core_install_mb + 1, goals.help_s * 2, goals.first_caption_demo_s + 0.1,
                                        goals.idle_uss_mb + 101, 100))
    by_where = {(t["target"].split(" <=")[0], t["where"].split(" (")[0]): t["met"] for t in missed}
    assert by_where[("core install", "core")] is False and by_where[("clipcap --help", "core")] is False
    assert by_where[("start to first caption", "ray-serve, demo, core")] is False
    # the full-size goal is the looser one: the same start time meets it
    assert by_where[("start to first caption", "ray-serve, full-int8, core")] is True
    assert by_where[("idle worker USS", "ray-serve, demo, core")] is False
