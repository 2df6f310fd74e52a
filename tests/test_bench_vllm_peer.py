"""The vLLM comparison's bookkeeping (clipcap_bench.serving_peers, clipcap_bench.prefix_front) without vLLM:
the arrivals, the payloads, percentiles that count failures, the verdicts, fake servers driven open loop
into a checked report, and our prefix front against the decoding loop. No timing is asserted."""
from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from clipcap_bench import serving_peers as peers
from clipcap_bench.prefix_front import EngineStats, PrefixRuntime, decode_embeds, make_app
from clipcap_bench.schema import VLLM_PEER_SCHEMA, Envelope, check_report


def test_the_schedule_is_poisson_at_the_rate_and_repeatable():
    schedule = peers.poisson_schedule(20.0, 50.0, seed=3)
    assert 850 < len(schedule) < 1150 and all(0 < a < 50 for a in schedule)
    assert schedule == sorted(schedule) == peers.poisson_schedule(20.0, 50.0, seed=3)
    assert schedule != peers.poisson_schedule(20.0, 50.0, seed=4)
    gaps = [b - a for a, b in zip(schedule, schedule[1:])]
    mean = sum(gaps) / len(gaps)
    spread = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert 0.04 < mean < 0.06 and 0.8 < spread / mean < 1.2  # exponential gaps: the deviation is the mean


def test_payloads_are_vllms_encoding_one_prefix_per_request():
    bodies = peers.payloads(3, 10, 16, seed=0)
    tensors = [decode_embeds(body) for body in bodies]
    assert all(t.shape == (10, 16) and t.dtype == torch.float32 for t in tensors)
    assert not torch.equal(tensors[0], tensors[1])
    assert bodies == peers.payloads(3, 10, 16, seed=0)
    vllm = peers.request_body(peers.VLLM, bodies[0], 20)
    assert vllm["min_tokens"] == vllm["max_tokens"] == 20 and vllm["ignore_eos"] and vllm["temperature"] == 0.0
    assert peers.request_body(peers.OURS, bodies[0], 20) == {"prompt_embeds": bodies[0], "max_tokens": 20}


def test_a_failed_request_counts_as_infinitely_late():
    assert peers.percentile([float(v) for v in range(1, 101)], 99) == 99.0
    assert peers.percentile([float(v) for v in range(1, 100)] + [math.inf], 99) == 99.0  # 1 in 100 may fail
    assert math.isinf(peers.percentile([1.0] * 98 + [math.inf] * 2, 99))
    cell = peers.summarize(peers.Arm(peers.OURS, "fp32", 8.0), [0.1] * 98 + [math.inf] * 2, cpu_s=3.0, wall_s=2.0,
                           server=None)
    assert cell["errors"] == 2 and math.isinf(cell["e2e_p99_ms"]) and cell["e2e_p50_ms"] == 100.0
    assert cell["cpu_cores"] == 1.5 and "engine" not in cell


def _cell(arm: peers.Arm, p99: float) -> dict:
    return {"arm": arm.name, "e2e_p99_ms": p99}


def test_verdicts_take_each_sides_best_arm_and_never_loosen():
    ours = [peers.Arm(peers.OURS, "int8", 16.0), peers.Arm(peers.OURS, "int4-wo", 16.0)]
    vllm = [peers.Arm(peers.VLLM, "bf16", 16.0)]
    target = [("best", ours, vllm)]
    met = peers.verdicts([_cell(ours[0], 900.0), _cell(ours[1], 400.0), _cell(vllm[0], 500.0)], target)[0]
    assert met["ours"] == ours[1].name and met["met"] is True
    tie = peers.verdicts([_cell(ours[0], 500.0), _cell(vllm[0], 500.0)], target)[0]
    assert tie["met"] is True  # "<=": equal is met
    missed = peers.verdicts([_cell(ours[0], 500.1), _cell(vllm[0], 500.0)], target)[0]
    assert missed["met"] is False
    refused = peers.verdicts([_cell(ours[0], math.inf), _cell(vllm[0], 3000.0)], target)[0]
    assert refused["met"] is False
    absent = peers.verdicts([_cell(vllm[0], 500.0)], target)[0]
    assert absent["met"] is None and absent["ours"] is None


def test_the_targets_come_from_targets_toml():
    (fp32_name, fp32_ours, fp32_vllm), (best_name, best_ours, best_vllm) = peers.target_arms()
    assert [a.precision for a in fp32_ours + fp32_vllm] == ["fp32", "fp32"]
    assert {a.rate for a in fp32_ours + fp32_vllm} == {8.0} and {a.rate for a in best_ours + best_vllm} == {16.0}
    assert {a.precision for a in best_ours} <= set(peers.OUR_BUNDLES) and best_vllm[0].precision in peers.VLLM_DTYPES


def test_same_weights_compares_the_fp32_arms_only():
    agree = peers.same_weights({"ours-fp32 8/s": [1, 2], "vllm-fp32 8/s": [1, 2], "vllm-bf16 16/s": [1, 3]})
    assert agree["fp32_agree"] is True
    assert peers.same_weights({"ours-fp32 8/s": [1, 2], "vllm-fp32 8/s": [1, 5]})["fp32_agree"] is False
    assert peers.same_weights({"ours-fp32 8/s": [1, 2]})["fp32_agree"] is False  # nothing to compare with


class FakeServer:
    """A server speaking one side's protocol in this process: answers after `delay_s`, refuses every `refuse`-th."""

    def __init__(self, side: str, delay_s: float, tokens: int, refuse: int = 0):
        from aiohttp import web

        self.side, self.delay_s, self.tokens, self.refuse, self.seen = side, delay_s, tokens, refuse, 0
        self.command = ["fake", side]
        app = web.Application(client_max_size=2**24)
        app.add_routes([web.post("/v1/completions", self.complete)])
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def complete(self, request):
        from aiohttp import web

        body = await request.json()
        assert decode_embeds(body["prompt_embeds"]).shape == (10, 16)
        self.seen += 1
        if self.refuse and self.seen % self.refuse == 0:
            return web.json_response({"error": "busy"}, status=503)
        await asyncio.sleep(self.delay_s)
        ids = list(range(body["max_tokens"]))
        reply = {"choices": [{"token_ids": ids}]} if self.side == peers.VLLM else {"token_ids": ids}
        return web.json_response(reply)

    def cpu_s(self) -> float:
        return 0.0

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fake_servers():
    servers = {peers.Arm(peers.OURS, "fp32", 40.0): FakeServer(peers.OURS, 0.02, 5, refuse=4),
               peers.Arm(peers.VLLM, "fp32", 40.0): FakeServer(peers.VLLM, 0.01, 5)}
    yield servers
    for server in servers.values():
        server.close()


def test_fake_servers_driven_open_loop_make_a_checked_report(fake_servers, tmp_path):
    from clipcap_bench.history import make_record

    arms = list(fake_servers)
    config = peers.VllmPeerConfig(duration_s=2.0, rounds=2, tokens=5)
    cells = peers.run_target(arms, fake_servers, config, width=16, seed=1)
    ours, vllm = cells
    schedules = [peers.poisson_schedule(40.0, 1.0, 1 + r) for r in range(2)]
    assert ours["requests"] == vllm["requests"] == sum(len(s) for s in schedules)  # the same arrivals, every round
    assert vllm["errors"] == 0 and ours["errors"] == ours["requests"] // 4  # every 4th refused, counted
    assert math.isinf(ours["e2e_p99_ms"]) and math.isfinite(vllm["e2e_p99_ms"])
    targets = [("fake", [arms[0]], [arms[1]])]
    report = Envelope(VLLM_PEER_SCHEMA).report({**vars(config), "prefix_width": 16}, cells=cells,
                                               targets=peers.verdicts(cells, targets), servers={},
                                               same_weights=peers.same_weights({}))
    check_report(report)
    assert report["targets"][0]["met"] is False
    assert "| missed |" in peers.vllm_peer_markdown(report)
    written = peers.write_vllm_peer_outputs(report, tmp_path / "out")
    assert [p.name for p in written] == ["vllm-peer.json", "vllm-peer.md", "vllm-peer.png"]
    assert all(p.stat().st_size > 0 for p in written)
    record = make_record(report, "vllm-peer", tmp_path)
    assert record["kind"] == "vllm-peer" and f"vllm-peer p99 ms {vllm['arm']}" in record["metrics"]
    report["targets"][0]["met"] = True  # a verdict that disagrees with its numbers is caught
    with pytest.raises(ValueError, match="disagrees"):
        check_report(report)


def test_our_prefix_front_decodes_like_the_decoding_loop(tiny_export):
    """Requests through the front (engine, PrefixRuntime, rows joining and leaving) give the tokens that
    decoding.generate gives for each prefix alone, and the engine's account counts the decoder calls."""
    from aiohttp.test_utils import TestClient, TestServer

    from clipcap.captioner import Captioner
    from clipcap.decoding import DecodingOptions, generate
    from clipcap.serving.engine import CaptionEngine

    opened = Captioner.from_path(tiny_export)
    stats = EngineStats()
    captioner = type(opened)(PrefixRuntime(opened.runtime, stats), opened.tokenizer, opened.config)
    engine = CaptionEngine(captioner)
    width, length = opened.config.gpt2.n_embd, opened.config.mapper.prefix_length
    prefixes = [torch.randn(length, width, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [generate(opened.runtime, p[None], DecodingOptions(max_tokens=6, ignore_stop=True), [], 6)[0]
                for p in prefixes]

    async def run() -> list[list[int]]:
        async with TestClient(TestServer(make_app(engine, stats))) as client:
            async def one(prefix):
                reply = await client.post("/v1/completions", json={"prompt_embeds": peers.encode_embeds(prefix),
                                                                   "max_tokens": 6})
                assert reply.status == 200
                return (await reply.json())["token_ids"]
            return list(await asyncio.gather(*(one(p) for p in prefixes)))

    try:
        assert asyncio.run(run()) == expected
    finally:
        engine.close()
    account = stats.read()
    assert account["requests"] == 4 and account["calls"]["prefill"]["calls"] >= 1
    assert sum(account["decode_steps_by_rows"].values()) == account["calls"]["decode"]["calls"] >= 5
