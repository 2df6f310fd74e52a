"""The serving load generator against a stand-in aiohttp server on loopback.

The real TorchServe path is exercised by tests/test_serving_e2e.py and by benchmarks/serving.py.
"""
import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from clipcap_bench.load import ServingLoadConfig, check_loopback, read_api_keys, run_serving_load
from clipcap_bench.report import write_serving_outputs
from clipcap_bench.schema import check_report

ROOT = Path(__file__).resolve().parent.parent


def test_loopback_only():
    for url in ("http://127.0.0.1:8080", "http://localhost:9000/", "http://[::1]:8080"):
        check_loopback(url)
    for url in ("http://10.0.0.5:8080", "http://example.com:8080", "ftp://127.0.0.1", "127.0.0.1:8080"):
        with pytest.raises(ValueError):
            check_loopback(url)


class StandInServer:
    """An aiohttp server on a free loopback port answering like TorchServe's /predictions/{model} and
    (management API) GET /models/{model}."""

    KEYS = {"inference": "test-inference-key", "management": "test-management-key"}

    def __init__(self):
        self.received: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def _predict(self, request):
        from aiohttp import web

        if request.headers.get("Authorization") != f"Bearer {self.KEYS['inference']}":
            return web.json_response({"code": 400, "type": "InvalidKeyException", "message": "bad token"}, status=400)
        model = request.match_info["model"]
        self.received[model] = self.received.get(model, 0) + 1
        await request.read()
        # Model "slow": its 5th request (after 2 warm-up ones) takes far longer than any client waits.
        await asyncio.sleep(4 if model == "slow" and self.received[model] == 5 else 0.002)
        return web.json_response({"caption": "a thing.", "timings_ms": {"preprocess": 1.0, "encode": 2.0, "decode": 3.0}})

    async def _describe(self, request):
        from aiohttp import web

        if request.headers.get("Authorization") != f"Bearer {self.KEYS['management']}":
            return web.json_response({"code": 400, "type": "InvalidKeyException"}, status=400)
        return web.json_response([{"modelName": request.match_info["model"], "batchSize": 8, "maxBatchDelay": 5,
                                   "minWorkers": 1, "maxWorkers": 1, "workers": [{"status": "READY"}]}])

    def _serve(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/predictions/{model}", self._predict)
        app.router.add_get("/models/{model}", self._describe)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_serving_load_report(tmp_path):
    with StandInServer() as server:
        url = f"http://127.0.0.1:{server.port}"
        config = ServingLoadConfig(url=url, models=["a", "b"], concurrency=[1, 4], requests=10, rounds=2, warmup=2,
                                   management_url=url)
        report = run_serving_load(config, StandInServer.KEYS, progress=False)
        assert server.received == {"a": 2 + 10 + 10, "b": 2 + 10 + 10}  # warm-up + each level
    check_report(report)
    assert sorted((c["model"], c["concurrency"]) for c in report["cells"]) == [("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    for cell in report["cells"]:
        assert cell["ok"] == cell["sent"] == 10 and cell["statuses"] == {"200": 10}
        assert cell["handler_ms"]["p50"] == 6.0 and cell["latency_ms"]["p50"] > 0 and cell["requests_per_s"] > 0
    assert report["settings"]["server"]["b"] == {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 1,
                                                 "maxWorkers": 1, "workers": 1}
    assert not any(key in json.dumps(report) for key in StandInServer.KEYS.values())
    written = write_serving_outputs(report, tmp_path)
    assert [p.name for p in written] == ["serving.json", "serving.md", "serving.png"]
    assert "| a | 4 | 10 / 10 |" in (tmp_path / "serving.md").read_text()
    with Image.open(written[2]) as image:
        assert image.format == "PNG"


def test_serving_load_stops_on_a_refused_token():
    with StandInServer() as server:
        config = ServingLoadConfig(url=f"http://127.0.0.1:{server.port}", models=["a"], concurrency=[1], requests=2)
        with pytest.raises(RuntimeError, match="warm-up request answered 400.*token"):
            run_serving_load(config, {"inference": "wrong", "management": "wrong"}, progress=False)


def test_serving_script_refuses_other_hosts_and_reads_the_key_file(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--url", "http://example.com:8080",
                             "--no-token"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "only targets loopback" in result.stderr
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": "i-key"}, "API": {"key": "x"}}))
    assert read_api_keys(key_file) == {"inference": "i-key", "management": "m"}
    with pytest.raises(FileNotFoundError, match="no-token"):
        read_api_keys(tmp_path / "absent.json")


def test_a_request_timeout_is_one_failed_request_and_the_run_goes_on():
    with StandInServer() as server:
        config = ServingLoadConfig(url=f"http://127.0.0.1:{server.port}", models=["slow"], concurrency=[2],
                                   requests=8, rounds=1, warmup=2, timeout_s=1.0)
        report = run_serving_load(config, StandInServer.KEYS, progress=False)
    (cell,) = report["cells"]
    assert cell["sent"] == 8 and cell["ok"] == 7 and cell["statuses"] == {"200": 7, "timeout": 1}
    assert "1 s request timeout" in cell["errors"][0]
    check_report(report)


# -- open loop ------------------------------------------------------------------------------------

def test_open_loop_sends_on_schedule_whatever_the_backlog():
    """A sender slower than the arrival gaps: an open loop still sends every scheduled request (many in
    flight at once); refusals and failures are counted, not raised; the objective counts only 200s."""
    from clipcap_bench.load import open_loop

    in_flight, most = [0], [0]

    async def send(payload):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.2)  # ~10 arrivals come in this time at 50/s
            if payload == "fail":
                raise ConnectionResetError("lost")
            return 503 if payload == "refuse" else 200
        finally:
            in_flight[0] -= 1

    payloads = ["ok", "ok", "refuse", "fail"]
    results = asyncio.run(open_loop(send, payloads, rates=[50.0, 10.0], duration_s=1.0, slo_ms=60_000, seed=3))
    assert [r.rate for r in results] == [50.0, 10.0]
    fast = results[0]
    assert most[0] > 1  # requests overlapped: nothing waited for an answer before sending
    assert fast.sent == sum(fast.statuses.values()) and fast.sent > 10
    assert set(fast.statuses) <= {"200", "503", "ConnectionResetError"}
    assert fast.ok == fast.statuses["200"]
    assert fast.within_slo == pytest.approx(fast.ok / fast.sent)
    assert fast.latency_ms["p50"] >= 200 * 0.9  # timed from the schedule, the sender's 0.2 s included
    with pytest.raises(ValueError, match="rates must be > 0"):
        asyncio.run(open_loop(send, payloads, rates=[0.0], duration_s=1.0, slo_ms=1.0))


def test_open_loop_report_against_a_stand_in_server(tmp_path):
    from clipcap_bench.load import OpenLoopConfig, run_open_loop
    from clipcap_bench.open_loop_profile import write_open_loop_outputs

    with StandInServer() as server:
        config = OpenLoopConfig(url=f"http://127.0.0.1:{server.port}", models=["clipcap"], rates=[5.0, 20.0], duration_s=1.0,
                                slo_ms=10_000, warmup=1)
        report = run_open_loop(config, StandInServer.KEYS, progress=False)
    check_report(report)
    assert [c["rate"] for c in report["cells"]] == [5.0, 20.0]
    assert all(c["ok"] == c["sent"] > 0 and c["within_slo"] == 1.0 for c in report["cells"])
    written = write_open_loop_outputs(report, tmp_path)
    assert all(p.exists() for p in written) and "offered req/s" in (tmp_path / "open_loop.md").read_text()


def test_a_warm_up_without_an_answer_stops_the_run_naming_the_target():
    import asyncio

    from clipcap_bench import client
    from clipcap_bench.torchserve import free_ports

    async def warm() -> None:
        async with client.session("key", timeout_s=5) as session:
            await client.warm_up(session, f"http://127.0.0.1:{free_ports(1)[0]}/predictions/m", [(b"x", "image/png")],
                                 2, "model 'm'")

    with pytest.raises(RuntimeError, match="model 'm': warm-up request got no answer"):
        asyncio.run(warm())
