"""The open-loop profile: capacity over a report's cells, its verdict against a target, the arguments of
benchmarks/photo.py --serve, the multipart bodies carrying options, stopping after a missed rate, and
one real run of a small export bundle behind TorchServe."""
import asyncio
import email.parser
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from clipcap_bench.capacity import Capacity, capacity, capacity_summary, meets_objective, target_verdict
from clipcap_bench.load import OpenLoopConfig, open_loop, with_options
from clipcap_bench.open_loop_profile import OpenLoopProfile, model_names

ROOT = Path(__file__).resolve().parent.parent
SLO = 1000.0


def cell(model: str, rate: float, passes: bool, failed: int = 0) -> dict:
    """A report cell that meets the objective or misses it (by p99 or, with `failed`, by non-200 answers)."""
    p99 = SLO * (0.5 if passes or failed else 1.5)
    sent = 20
    return {"model": model, "rate": rate, "sent": sent, "ok": sent - (0 if passes else failed),
            "latency_ms": {"p50": p99 / 2, "p99": p99}, "within_slo": 1.0}


@st.composite
def sweeps(draw):
    """Cells of up to three models, each over distinct rates with random outcomes, in a shuffled order."""
    cells = []
    for model in draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True)):
        rates = draw(st.lists(st.sampled_from([0.5, 1, 1.5, 2, 3, 4, 6, 8, 16]), min_size=1, max_size=6, unique=True))
        for rate in rates:
            passes = draw(st.booleans())
            cells.append(cell(model, float(rate), passes, failed=0 if passes else draw(st.integers(0, 1))))
    return draw(st.permutations(cells))


@given(sweeps())
def test_capacity_is_the_top_of_the_passing_run_from_the_lowest_rate(cells):
    found = capacity(cells, SLO)
    assert set(found) == {c["model"] for c in cells}
    for model, result in found.items():
        rows = sorted((c for c in cells if c["model"] == model), key=lambda c: c["rate"])
        outcomes = [meets_objective(c, SLO) for c in rows]
        assert result.censored == all(outcomes)
        if result.rate is None:
            assert not outcomes[0]
            continue
        index = [c["rate"] for c in rows].index(result.rate)
        assert all(outcomes[: index + 1])  # it and every lower rate met the objective
        assert index == len(rows) - 1 or not outcomes[index + 1]  # the next rate up missed it


def test_a_miss_bounds_the_capacity_whatever_follows_and_failures_count_as_misses():
    cells = [cell("m", 1, True), cell("m", 2, False), cell("m", 4, True), cell("f", 1, True), cell("f", 2, False, 1)]
    assert capacity(cells, SLO) == {"m": Capacity(1.0, False), "f": Capacity(1.0, False)}
    assert not meets_objective({"sent": 0, "ok": 0, "latency_ms": {}}, SLO)


@pytest.mark.parametrize("baseline, other, verdict", [
    (Capacity(2.0, False), Capacity(3.0, False), "met"),
    (Capacity(2.0, False), Capacity(3.0, True), "met"),
    (Capacity(2.0, False), Capacity(2.5, False), "missed"),
    (Capacity(2.0, False), Capacity(None, False), "missed"),
    (Capacity(2.0, False), Capacity(2.5, True), "undetermined"),
    (Capacity(2.0, True), Capacity(4.0, True), "undetermined"),
    (Capacity(None, False), Capacity(4.0, False), "undetermined"),
])
def test_target_verdict(baseline, other, verdict):
    ratio, said = target_verdict(baseline, other, 1.5)
    assert said.split(":")[0] == verdict
    assert ratio is None if baseline.rate is None else ratio == (other.rate or 0) / baseline.rate


def test_capacity_summary_names_the_baseline_first():
    cells = [cell("today", 1, True), cell("today", 2, False), cell("best", 1, True), cell("best", 2, True)]
    summary = capacity_summary(cells, ["today", "best"], SLO, 1.5)
    assert summary["baseline"] == "today"
    assert [(r["model"], r["rate"], r["ratio"], r["verdict"]) for r in summary["models"]] == [
        ("today", 1.0, 1.0, "baseline"), ("best", 2.0, 2.0, "met")]


@settings(max_examples=50)
@given(st.lists(st.text("aZ9_-. é+", min_size=1, max_size=8).filter(lambda t: t not in (".", "..")), min_size=1,
                max_size=5))
def test_model_names_are_distinct_archive_names(folders):
    import re

    names = model_names([Path("/bundles") / f for f in folders])
    assert len(set(names)) == len(names) == len(folders)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_\-.]*", n) for n in names)


def test_profile_refuses_bad_settings():
    for bad in (dict(payload="gif"), dict(bundles=[]), dict(rates=[2.0, 1.0]), dict(rates=[1.0, 1.0]),
                dict(rates=[0.0]), dict(threads=0), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            OpenLoopProfile(**bad).validate()
    with pytest.raises(ValueError, match="ascending"):
        OpenLoopConfig(rates=[4.0, 2.0], stop_after_miss=True).validate()


def test_options_travel_as_multipart_fields_before_the_image():
    image = bytes(range(256)) * 4
    data, content_type = with_options((image, "image/jpeg"), {"max_tokens": 20})
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    field, part = message.get_payload()
    assert (field.get_param("name", header="content-disposition"), field.get_payload()) == ("max_tokens", "20")
    assert part.get_content_type() == "image/jpeg" and part.get_payload(decode=True) == image
    assert with_options((image, "image/jpeg"), {}) == (image, "image/jpeg")


def test_open_loop_stops_after_the_first_missed_rate():
    async def send(payload):
        await asyncio.sleep(0.05)
        return 200

    results = asyncio.run(open_loop(send, ["x"], rates=[20.0, 40.0], duration_s=0.3, slo_ms=1.0, stop_after_miss=True))
    assert [r.rate for r in results] == [20.0]


def _photo_main(argv: list[str], monkeypatch) -> OpenLoopProfile:
    """benchmarks/photo.py's arguments turned into the profile it would serve (nothing is served)."""
    photo = runpy.run_path(str(ROOT / "benchmarks" / "photo.py"))
    parser_calls = {}

    def capture(profile, repo, progress=True):
        parser_calls["profile"] = profile
        raise SystemExit(0)

    monkeypatch.setattr("clipcap_bench.open_loop_profile.run_open_loop_profile", capture)
    with pytest.raises(SystemExit) as exit_info:
        photo["main"](argv)
    assert exit_info.value.code == 0
    return parser_calls["profile"]


def test_photo_serve_arguments(monkeypatch, tmp_path):
    profile = _photo_main(["--serve-only", "--rates", "1,2", "--threads", "2", "--payload", "samples-png"], monkeypatch)
    assert profile.bundles == [Path("models/shapes-demo")] and profile.rates == [1.0, 2.0]
    assert (profile.threads, profile.payload, profile.max_tokens, profile.stop_after_miss) == (2, "samples-png", 20, True)
    # Built full-size bundles (their marker files) are reused, not rebuilt; --full-size picks and orders them.
    for name, marker in (("model", "model.safetensors"), ("onnx", "export.json"), ("onnx-int8", "export.json"),
                         ("onnx-int8-wo", "export.json"), ("onnx-int4-wo", "export.json"),
                         ("onnx-int8-encoder", "export.json"), ("onnx-int4-wo-int8-encoder", "export.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).touch()
    demo = ROOT / "models" / "shapes-demo"
    profile = _photo_main(["--serve-only", "--bundle", str(demo), "--make-full-size", str(tmp_path),
                           "--full-size", "onnx-int8-encoder,onnx-int8", "--max-tokens", "0", "--all-rates"], monkeypatch)
    assert profile.bundles == [demo, tmp_path / "onnx-int8-encoder", tmp_path / "onnx-int8"]
    assert profile.max_tokens is None and not profile.stop_after_miss
    for bad in (["--serve", "--rates", "4,2"], ["--serve", "--payload", "gif"],
                ["--serve-only", "--make-full-size", str(tmp_path), "--full-size", "onnx-int9"],
                ["--serve-only", "--bundle", str(tmp_path)]):  # no bundle there
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "benchmarks" / "photo.py"))["main"](bad)
        assert exit_info.value.code == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 11+")
@pytest.mark.skipif(not (Path(sys.executable).parent / "torchserve").exists(), reason="torchserve is not installed")
def test_an_export_bundle_served_open_loop(tmp_path, tiny_export):
    """The tiny ONNX export packed, served by a real TorchServe and loaded open-loop with samples/ PNGs."""
    import numpy as np

    from clipcap_bench.history import make_record
    from clipcap_bench.open_loop_profile import open_loop_markdown, run_open_loop_profile, write_open_loop_outputs
    from clipcap.captioner import Captioner

    profile = OpenLoopProfile(bundles=[tiny_export], work=tmp_path / "work", rates=[2.0, 4.0], duration_s=1.5,
                              slo_ms=60_000, payload="samples-png", max_tokens=5, stop_after_miss=False)
    report = run_open_loop_profile(profile, ROOT, progress=False)
    (bundle,) = report["settings"]["bundles"]
    assert bundle["kind"] == "onnx-fp32" and bundle["weights"] == "encoder fp32, decoder fp32"
    assert bundle["mar_built"] and bundle["mar_bytes"] > 0
    # The max_tokens field travelled: each answer is as long as the library's caption with max_tokens 5.
    captioner = Captioner.from_path(tiny_export)
    options = captioner.default_options().replace(max_tokens=5)
    pixels = np.stack([captioner.load_pixels_file(p) for p in report["settings"]["images"]])
    assert [p["tokens"] for p in bundle["probes"]] == [len(c.token_ids) for c in
                                                       captioner.caption_pixels(pixels, options).captions]
    assert [c["rate"] for c in report["cells"]] == [2.0, 4.0]
    assert all(c["ok"] == c["sent"] > 0 for c in report["cells"])
    assert report["capacity"]["models"][0]["rate"] == 4.0
    assert "| tiny-onnx | 4 |" in open_loop_markdown(report)
    assert all(p.exists() for p in write_open_loop_outputs(report, tmp_path / "out"))
    assert make_record(report, "photo", ROOT)["metrics"]  # the history takes it


def test_a_refused_probe_says_what_the_server_answered():
    from clipcap_bench.open_loop_profile import probe
    from test_bench_load import StandInServer

    with StandInServer() as server:
        with pytest.raises(RuntimeError, match="answered 400.*bad token"):
            probe(f"http://127.0.0.1:{server.port}", "clipcap", "wrong-key", (b"image", "image/png"))


def test_an_archive_is_packed_once_per_input(tiny_bundle, tiny_export, tmp_path):
    """The one packer of every served benchmark: rebuilt only when the bundle, handler, config or backend change."""
    from clipcap_bench.torchserve import packed_archive

    out = tmp_path / "store" / "m.mar"
    assert packed_archive(tiny_bundle, ROOT, out) is True and out.is_file()
    assert packed_archive(tiny_bundle, ROOT, out) is False
    assert packed_archive(tiny_export, ROOT, out) is True  # another bundle
    assert packed_archive(tiny_export, ROOT, out, backend="onnxruntime") is True  # another backend
