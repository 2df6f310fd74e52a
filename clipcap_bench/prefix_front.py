"""Our side of the vLLM comparison: the CaptionEngine behind a small HTTP front fed prefix embeddings.

The peer (vLLM's completions API) takes prompt embeddings, not images, so our side skips the image
encoder too: `PrefixRuntime` hands the request's (P, E) prefix to the decode as it is. A request is
the same body vLLM gets (`prompt_embeds`: base64 of a torch.save'd tensor; `max_tokens`), decoded
greedily for exactly `max_tokens` tokens (stop token ignored) and answered with its token ids and
text. `GET /stats` gives the engine's own account since the last `POST /stats/reset`: time in decode
steps (by rows), in prefills (requests joining), in the cache's copies, and the most requests in
flight, so a run can tell a slow step from Python overhead or a full queue.

    python -m clipcap_bench.prefix_front BUNDLE --port 8100 --threads 1
"""
from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from collections import defaultdict

import torch

from clipcap.decoding import DecodingOptions


class PrefixRuntime:
    """A runtime whose inputs are prefix embeddings already: `encode` is the identity, the rest the inner one's.
    Every decoder call is timed into `stats`: a step of one position per row is a decode step, a longer one
    a prefill (the requests joining), `join` / `select` the cache's copies as rows join and leave."""

    def __init__(self, inner, stats: "EngineStats"):
        self.inner, self.stats = inner, stats

    def encode(self, prefix: torch.Tensor) -> torch.Tensor:
        return prefix  # (B, P, E) as the client sent it

    def step(self, embeds: torch.Tensor, cache):
        start = time.perf_counter()
        out = self.inner.step(embeds, cache)
        self.stats.add("decode" if embeds.shape[1] == 1 else "prefill", embeds.shape[0], time.perf_counter() - start)
        return out

    def join(self, first, second):
        start = time.perf_counter()
        out = self.inner.join(first, second)
        self.stats.add("join", 0, time.perf_counter() - start)
        return out

    def select(self, cache, index: torch.Tensor):
        start = time.perf_counter()
        out = self.inner.select(cache, index)
        self.stats.add("select", 0, time.perf_counter() - start)
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class EngineStats:
    """The decoder's calls by kind and rows, and the requests in flight; read and reset over HTTP."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.started = time.perf_counter()
            self.calls: dict[tuple[str, int], list] = defaultdict(lambda: [0, 0.0])  # (kind, rows) -> [count, s]
            self.in_flight = self.most_in_flight = self.requests = 0

    def add(self, kind: str, rows: int, seconds: float) -> None:
        with self.lock:
            cell = self.calls[(kind, rows)]
            cell[0] += 1
            cell[1] += seconds

    def request(self, change: int) -> None:
        with self.lock:
            self.in_flight += change
            self.requests += max(0, change)
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def read(self) -> dict:
        """wall_s since the reset; per kind its seconds and calls; decode steps' ms by rows; the most in flight."""
        with self.lock:
            kinds: dict[str, dict] = defaultdict(lambda: {"s": 0.0, "calls": 0})
            for (kind, _), (count, seconds) in self.calls.items():
                kinds[kind]["s"] += seconds
                kinds[kind]["calls"] += count
            return {"wall_s": time.perf_counter() - self.started, "requests": self.requests,
                    "most_in_flight": self.most_in_flight, "calls": dict(kinds),
                    "decode_ms_by_rows": {str(rows): seconds * 1e3 / count for (kind, rows), (count, seconds)
                                          in sorted(self.calls.items()) if kind == "decode"},
                    "decode_steps_by_rows": {str(rows): count for (kind, rows), (count, _)
                                             in sorted(self.calls.items()) if kind == "decode"}}


def decode_embeds(text: str) -> torch.Tensor:
    """base64 of a torch.save'd (P, E) tensor -> the tensor (vLLM's prompt_embeds encoding)."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def make_app(engine, stats: EngineStats):
    from aiohttp import web

    from clipcap.serving.engine import CaptionFailed, CaptionRequest

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        prefix = decode_embeds(body["prompt_embeds"]).float()
        options = DecodingOptions(max_tokens=int(body["max_tokens"]), ignore_stop=True)
        stats.request(+1)
        try:
            result = await engine.submit(CaptionRequest(options, pixels=prefix)).wait()
        except CaptionFailed as failure:
            return web.json_response({"error": failure.message}, status=failure.status)
        finally:
            stats.request(-1)
        return web.json_response({"token_ids": result.token_ids, "text": result.caption})

    async def read_stats(_: web.Request) -> web.Response:
        return web.json_response(stats.read())

    async def reset_stats(_: web.Request) -> web.Response:
        stats.reset()
        return web.json_response({})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(client_max_size=64 * 2**20)
    app.add_routes([web.post("/v1/completions", complete), web.get("/stats", read_stats),
                    web.post("/stats/reset", reset_stats), web.get("/health", health)])
    return app


def serve(bundle: str, port: int, threads: int = 1) -> None:
    """The engine over `bundle`'s decoder (the handler's engine settings) on 127.0.0.1:`port`, until killed."""
    from aiohttp import web

    from clipcap.captioner import Captioner
    from clipcap.serving.config import ServingConfig
    from clipcap.serving.engine import CaptionEngine, EngineConfig

    torch.set_num_threads(threads)
    opened = Captioner.from_path(bundle)
    handler, stats = ServingConfig(), EngineStats()
    captioner = type(opened)(PrefixRuntime(opened.runtime, stats), opened.tokenizer, opened.config)
    engine = CaptionEngine(captioner, EngineConfig(
        max_rows=handler.batch_rows, encode_batch=handler.encode_batch, encode_wait_ms=handler.encode_wait_ms,
        max_queued=handler.max_queued, decode_threads=handler.decode_threads))
    try:
        web.run_app(make_app(engine, stats), host="127.0.0.1", port=port, print=None, access_log=None)
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="an export bundle (its decoder is used)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="compute threads")
    args = parser.parse_args(argv)
    serve(args.bundle, args.port, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
