"""The paired regression check: the signed-rank test's exact level, its verdicts on scripted rounds, its simulated
false-alarm rate and power under this machine's recorded noise, and the A/B run's plumbing.

Everything here is deterministic (scripted values, a fixed simulation seed whose error is far inside the
margins); `test_a_real_paired_run_catches_a_planted_slowdown` measures for real and runs only with
`-m timing`, on a quiet machine.
"""
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clipcap_bench.experiment import interleaved_rounds, rotation
from clipcap_bench.ab import ABConfig, base_tree, judge_rounds, round_metrics, run_paired
from clipcap_bench.history import HISTORY_DIR, load_records
from clipcap_bench.noise import NoiseModel, fit_noise, flag_rate
from clipcap_bench.paired import PairedTest, hodges_lehmann, judge, signed_rank_p

ROOT = Path(__file__).resolve().parent.parent


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=3, max_size=10), st.sampled_from([0.01, 0.05, 0.1]))
def test_under_no_change_the_test_fires_in_at_most_alpha_of_sign_patterns(magnitudes, alpha):
    """The exact level: over all 2^n equally likely sign patterns (ties included), P(p_worse <= alpha) <= alpha."""
    fired = sum(signed_rank_p(np.array(magnitudes) * np.array(signs))[0] <= alpha
                for signs in itertools.product((-1, 1), repeat=len(magnitudes)))
    assert fired / 2 ** len(magnitudes) <= alpha


def test_exact_p_values_on_known_cases():
    assert signed_rank_p(np.array([1.0, 2, 3, 4, 5])) == (pytest.approx(1 / 32), 1.0)
    assert signed_rank_p(np.array([-1.0, 2, 3, 4, 5]))[0] == pytest.approx(2 / 32)  # rank sums 15 and 14
    assert signed_rank_p(np.zeros(4)) == (1.0, 1.0)
    assert hodges_lehmann(np.array([1.0, 2.0, 9.0])) == pytest.approx(3.5)  # Walsh averages 1 1.5 2 5 5.5 9


ROUNDS = 12
JITTER = np.array([1.0, 1.03, 0.98, 1.01, 0.97, 1.02, 0.99, 1.04, 0.96, 1.0, 1.02, 0.98])


@pytest.mark.parametrize("factor, better, verdict", [
    (1.25, "lower", "regression"),  # a time 25% longer
    (0.75, "lower", "improvement"),
    (1.05, "lower", "within noise"),  # consistent, but under the 10% minimum effect
    (1.0, "lower", "within noise"),
    (0.75, "higher", "regression"),  # a rate 25% lower
])
def test_verdicts_on_scripted_rounds(factor, better, verdict):
    old = (20 * JITTER).tolist()
    new = (20 * factor * JITTER[::-1]).tolist()
    assert judge("e2e", old, new, better).verdict == verdict


def test_the_minimum_effect_and_alpha_are_boundaries():
    old = [10.0] * ROUNDS
    assert judge("m", old, [11.2] * ROUNDS, "lower", PairedTest(min_effect=0.10)).verdict == "regression"
    assert judge("m", old, [10.9] * ROUNDS, "lower", PairedTest(min_effect=0.10)).verdict == "within noise"
    five = [10.0] * 5  # five rounds all worse: p = 1/32 > 0.01, < 0.05
    assert judge("m", five, [13.0] * 5, "lower", PairedTest(alpha=0.01)).verdict == "within noise"
    assert judge("m", five, [13.0] * 5, "lower", PairedTest(alpha=0.05)).verdict == "regression"


@pytest.mark.parametrize("old, new, better, message", [
    ([1.0, 2.0], [1.0], "lower", "paired rounds"), ([], [], "lower", "paired rounds"),
    ([1.0], [0.0], "lower", "positive"), ([1.0], [1.0], "faster", "better"),
])
def test_bad_rounds_are_refused(old, new, better, message):
    with pytest.raises(ValueError, match=message):
        judge("m", old, new, better)


def test_bad_test_settings_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        PairedTest(alpha=1.5)


# ---------------------------------------------------------------------------------------------
# Simulated reruns under this machine's recorded noise.

MACHINE_NOISE = fit_noise(load_records(ROOT / HISTORY_DIR), fingerprint="03cfbb2e2d")


def test_the_noise_model_is_fitted_to_recorded_rounds():
    assert len(MACHINE_NOISE.residuals) >= 24 and 0.05 < MACHINE_NOISE.sigma < 1.0
    with pytest.raises(ValueError, match="at least 8"):
        NoiseModel((0.1, -0.1))


def test_unchanged_code_is_flagged_in_under_5_percent_of_simulated_reruns():
    """The default design (30 rounds, alpha 0.01, 10% minimum effect) under the recorded noise: about 0.6%.
    2000 reruns: the estimate's standard error is 0.2%, so no seed comes near 5%."""
    assert flag_rate(MACHINE_NOISE, ABConfig().rounds, 1.0, reruns=2000) < 0.05


def test_a_planted_25_percent_slowdown_is_flagged_in_95_percent_of_simulated_reruns():
    """About 99% with the default design; 2000 reruns: standard error 0.25%."""
    assert flag_rate(MACHINE_NOISE, ABConfig().rounds, 1.25, reruns=2000) >= 0.95


def test_fewer_rounds_lose_the_power():
    """What sets the default: 8 rounds catch a 25% slowdown in well under 95% of reruns under this noise."""
    assert flag_rate(MACHINE_NOISE, 8, 1.25, reruns=1000) < 0.8


# ---------------------------------------------------------------------------------------------
# The experiment skeleton and the A/B run's plumbing, with scripted arms.


@given(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=6, unique=True), st.integers(0, 50))
def test_rotation_puts_every_arm_in_every_position_once_per_cycle(names, start):
    orders = [rotation(names, start + index) for index in range(len(names))]
    assert all(sorted(order) == sorted(names) for order in orders)
    for position in range(len(names)):
        assert sorted(order[position] for order in orders) == sorted(names)


def test_interleaved_rounds_drop_the_warm_up_and_keep_one_sample_per_round():
    calls = []
    arms = {name: (lambda item, name=name: calls.append((name, item)) or len(calls)) for name in ("a", "b", "c")}
    samples = interleaved_rounds(arms, ["x", "y"], rounds=3, warmup=1, progress=False)
    assert calls[:6] == [("a", "x"), ("b", "x"), ("c", "x"), ("b", "x"), ("c", "x"), ("a", "x")]
    assert {key: len(values) for key, values in samples.items()} == {(n, i): 3 for n in "abc" for i in "xy"}
    assert samples[("a", "x")] == [6, 8, 10]  # the call numbers of a's measured rounds on x


class ScriptedArm:
    """Each call is one round: `requests` requests with scripted times (x `factor`), logged in `calls`."""

    def __init__(self, name: str, factor: float, calls: list):
        self.name, self.factor, self.calls, self.index = name, factor, calls, 0

    def __call__(self) -> dict:
        self.calls.append(self.name)
        jitter = JITTER[self.index % JITTER.size]
        self.index += 1
        e2e = 40.0 * self.factor * jitter
        return {"requests": [{"ttft": 10 * self.factor * jitter, "tpot": 1.5 * self.factor * jitter, "e2e": e2e}] * 4,
                "wall_s": 4 * e2e / 1e3}


@pytest.mark.parametrize("factor, expected", [(1.0, "within noise"), (1.25, "regression")])
def test_paired_rounds_interleave_and_judge(factor, expected):
    calls = []
    rounds = run_paired({"old": ScriptedArm("old", 1.0, calls), "new": ScriptedArm("new", factor, calls)}, ROUNDS,
                        progress=False)
    assert calls[:2] == ["old", "new"]  # the warm-up round
    assert calls[2:8] == ["old", "new", "new", "old", "old", "new"]  # the order alternates round by round
    assert len(rounds["old"]) == len(rounds["new"]) == ROUNDS and rounds["objective_ms"] == pytest.approx(80.0)
    verdicts = {v.metric: v.verdict for v in judge_rounds(rounds, PairedTest())}
    assert set(verdicts) == {"ttft", "tpot", "e2e", "goodput"}
    assert verdicts["ttft"] == verdicts["tpot"] == verdicts["e2e"] == expected


def test_round_metrics_and_goodput_against_the_objective():
    requests = [{"ttft": t, "tpot": 1.0, "e2e": e} for t, e in ((5, 10), (6, 30), (7, 50))]
    metrics = round_metrics(requests, wall_s=0.5, objective_ms=30)
    assert metrics == {"ttft": 6.0, "tpot": 1.0, "e2e": 30.0, "goodput": 4.0}  # 2 within 30 ms in 0.5 s
    rounds = {"old": [metrics] * 3, "new": [round_metrics(requests, 0.5, 5)] * 3}  # goodput 0: not judged
    assert "goodput" not in {v.metric for v in judge_rounds(rounds, PairedTest())}


def test_the_base_tree_is_the_revision_s_library(tmp_path):
    tree = base_tree(ROOT, "HEAD", tmp_path)
    assert (tree / "clipcap" / "__init__.py").is_file() and not (tree / "clipcap_bench").exists()
    assert base_tree(ROOT, "HEAD", tmp_path) == tree  # unpacked once
    with pytest.raises(ValueError, match="not a commit"):
        base_tree(ROOT, "no-such-revision", tmp_path)


@pytest.mark.parametrize("field, value, message", [("rounds", 0, "rounds"), ("tokens", 1, "tokens"),
                                                   ("slowdown", 0.5, "slowdown"), ("requests", 0, "requests")])
def test_bad_ab_settings_are_refused_before_any_worker_starts(field, value, message, tmp_path):
    from clipcap_bench.ab import paired_workers

    config = ABConfig(**{field: value}, work=tmp_path)
    with pytest.raises(ValueError, match=message):
        with paired_workers(config, ROOT):
            pass
    assert not (tmp_path / "harness").exists()


def test_check_script_refuses_an_unknown_base(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check.py"), "--base", "no-such-revision",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "not a commit" in result.stderr


def test_a_real_paired_run_measures_each_arm_with_its_own_library(tmp_path):
    """Structure only (no verdict is asserted): two workers, the old one on HEAD's unpacked clipcap."""
    import json

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check.py"), "--base", "HEAD", "--rounds", "2",
                             "--quiet", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert len(report["rounds"]["old"]) == len(report["rounds"]["new"]) == 2
    assert "build/bench/ab/base-" in report["libraries"]["old"]
    assert report["libraries"]["new"] == str((ROOT / "clipcap").resolve())
    assert {"ttft", "tpot", "e2e"} <= {v["metric"] for v in report["verdicts"]}
    assert "| e2e | 2 |" in (tmp_path / "check.md").read_text()


@pytest.mark.timing
@pytest.mark.parametrize("slowdown, code", [(1.0, 0), (1.25, 1)])
def test_a_real_paired_run_catches_a_planted_slowdown(slowdown, code, tmp_path):
    """The working tree against itself, then with every runtime call 25% slower: on a quiet machine the
    first passes and the second fails (their long-run rates: benchmarks/power.py)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check.py"), "--rerun", "--slowdown",
                             str(slowdown), "--fail-on-regression", "--quiet", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == code, result.stdout + result.stderr
