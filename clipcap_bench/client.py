"""The one HTTP client of the serving benchmarks: an authenticated aiohttp session, one request, and a warm-up
that raises on the first answer that is not 200 (a wrong model name or token stops the run before it counts)."""
from __future__ import annotations

import asyncio
import time


def session(token: str | None, timeout_s: float, limit: int = 0):
    """An aiohttp session sending `Authorization: Bearer token` (none without a token) with a per-request
    timeout. `limit`: the connection pool's size; 0, no limit (an open loop must never queue in the client)."""
    import aiohttp

    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"} if token else {},
                                 timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 connector=aiohttp.TCPConnector(limit=limit))


async def post(session, url: str, payload: tuple[bytes, str]) -> tuple[int, bytes]:
    """POST one (bytes, content type) payload; (status, body)."""
    data, content_type = payload
    async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
        return response.status, await response.read()


async def warm_up(session, url: str, payloads: list, count: int, what: str) -> None:
    """`count` requests one by one (payloads in turn); RuntimeError naming `what` and the answer on the first
    that is not 200, or on no answer at all."""
    import aiohttp

    for index in range(count):
        try:
            status, body = await post(session, url, payloads[index % len(payloads)])
        except (asyncio.TimeoutError, aiohttp.ClientError) as error:
            raise RuntimeError(f"{what}: warm-up request got no answer ({error!r})") from None
        if status != 200:
            raise RuntimeError(f"{what}: warm-up request answered {status}: {body[:300].decode(errors='replace')} "
                               "(wrong model name, or a missing/expired token?)")


def probe(url: str, token: str, payload: tuple[bytes, str], timeout_s: float = 120.0) -> tuple[int, bytes, float]:
    """One request alone, outside any load: (status, body, latency in ms)."""
    async def once() -> tuple[int, bytes, float]:
        async with session(token, timeout_s) as client:
            start = time.perf_counter()
            status, body = await post(client, url, payload)
            return status, body, (time.perf_counter() - start) * 1e3

    return asyncio.run(once())
