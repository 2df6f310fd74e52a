"""The benchmark scripts write no tracked file by default: every default output is under build/, and
`make bench` records nothing unless asked."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def out_defaults(path: Path) -> list[str]:
    """The source text of every `add_argument("--out", default=...)` default in `path`."""
    defaults = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--out"):
            defaults += [ast.unparse(k.value) for k in node.keywords if k.arg == "default"]
    return defaults


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_default_outputs_are_under_build(script):
    for default in out_defaults(script):
        assert default == "None" or re.search(r"""["']build["'/]""", default), f"{script.name}: --out {default}"


def test_the_walk_sees_the_defaults():
    assert len(SCRIPTS) >= 10 and out_defaults(ROOT / "benchmarks" / "trends.py")


def test_make_bench_records_nothing():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/quick.py" in recipe and "--record" not in recipe


def test_steps_run_in_order_under_one_bar_and_return_their_results(capsys):
    from clipcap_bench.steps import run_steps

    order = []
    assert run_steps([("a", lambda: order.append("a") or 1), ("b", lambda: order.append("b") or 2)], "build") == [1, 2]
    assert order == ["a", "b"] and "build" in capsys.readouterr().err  # the bar, on stderr
    assert run_steps([], "nothing") == [] and capsys.readouterr().err == ""


def test_the_envelope_holds_what_every_report_starts_with():
    from clipcap_bench.schema import ENVELOPE_KEYS, SERVING_SCHEMA, Envelope

    envelope = Envelope(SERVING_SCHEMA)
    report = envelope.report({"path": Path("x")}, cells=[])
    assert set(ENVELOPE_KEYS) <= set(report) and report["schema"] == SERVING_SCHEMA
    assert report["settings"] == {"path": "x"}  # JSON-able
    assert report["load_average"]["before"] == envelope.load_before and len(report["load_average"]["after"]) == 3
    assert report["created_utc"] == envelope.created_utc and report["cells"] == []
