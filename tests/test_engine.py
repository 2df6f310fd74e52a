"""CaptionEngine: admission, iteration-level joins, streaming, cancellation, deadlines, isolation of failures.

The scheduling tests hold every runtime step at a gate the test opens one step at a time, so what
joins which step is decided by the test, never by thread timing.
"""
from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest

from clipcap.arrays import to_numpy
from clipcap.captioner import Captioner
from clipcap.decoding import DecodingOptions
from clipcap.serving.engine import CLIENT_GONE, CaptionEngine, CaptionFailed, CaptionRequest, EngineBusy, EngineConfig
from conftest import random_images

LONG = DecodingOptions(max_tokens=12, ignore_stop=True)  # exactly 12 tokens: many steps to act within


class Gate:
    """A runtime wrapper whose `step` waits until the test opens it; records each step's (rows, length)."""

    def __init__(self, runtime):
        self.inner = runtime
        self.calls: list[tuple[int, int]] = []
        self._condition = threading.Condition()
        self._opened = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, embeds, cache):
        with self._condition:
            self.calls.append(tuple(embeds.shape[:2]))
            index = len(self.calls)
            self._condition.notify_all()
            assert self._condition.wait_for(lambda: self._opened >= index, timeout=60), "the test never opened the gate"
        return self.inner.step(embeds, cache)

    def wait_entered(self, count: int) -> None:
        """Until the engine has entered `count` steps (it blocks in the last)."""
        with self._condition:
            assert self._condition.wait_for(lambda: len(self.calls) >= count, timeout=60), (count, self.calls)

    def open(self, steps: int = 1) -> None:
        with self._condition:
            self._opened += steps
            self._condition.notify_all()

    def open_all(self) -> None:
        self.open(10**6)


@pytest.fixture(scope="module")
def captioner(tiny_bundle):
    return Captioner.from_path(tiny_bundle)


@pytest.fixture(scope="module")
def pixels(captioner):
    return captioner.preprocess(random_images(6, seed=21))


def alone(captioner, pixels, index: int, options: DecodingOptions) -> list[int]:
    return captioner.caption_pixels(pixels[[index]], options).captions[0].token_ids


def gated(captioner, **config) -> tuple[CaptionEngine, Gate]:
    gate = Gate(captioner.runtime)
    return CaptionEngine(Captioner(gate, captioner.tokenizer, captioner.config), EngineConfig(**config)), gate


def test_mixed_requests_caption_as_alone(captioner, pixels):
    """Greedy, beam, seeded nucleus and token limits, submitted together and in a stream: each caption is its
    one-by-one caption (the tiny model's captions are far from ties; tests/test_continuous_batching.py checks
    the rounding argument itself)."""
    mix = [DecodingOptions(), DecodingOptions(strategy="beam", beam_size=3), DecodingOptions(max_tokens=3),
           DecodingOptions(strategy="nucleus", seed=7, top_p=0.95, temperature=1.5),
           DecodingOptions(strategy="beam", beam_size=2, temperature=0.5), DecodingOptions()]
    engine = CaptionEngine(captioner, EngineConfig(max_rows=6, encode_batch=2))
    try:
        handles = []
        for index, options in enumerate(mix):
            handles.append(engine.submit(CaptionRequest(options, pixels=pixels[index])))
            if index % 2:
                time.sleep(0.01)  # some join a running decode, some start with it: either way the same captions
        for index, (handle, options) in enumerate(zip(handles, mix)):
            assert handle.result(60).token_ids == alone(captioner, pixels, index, options), options
    finally:
        engine.close()


def test_a_request_joins_the_running_decode_at_the_next_step(captioner, pixels):
    engine, gate = gated(captioner)
    try:
        first = engine.submit(CaptionRequest(LONG, pixels=pixels[0]))
        gate.wait_entered(1)  # first's prefix step
        gate.open()
        gate.wait_entered(2)  # first's second token, one row
        second = engine.submit(CaptionRequest(LONG, pixels=pixels[1]))
        gate.open()
        gate.wait_entered(3)
        assert gate.calls[2][0] == 1 and gate.calls[2][1] > 1  # second's prefix step, alone
        gate.open()
        gate.wait_entered(4)
        assert gate.calls[3] == (2, 1)  # then one step for both rows
        gate.open_all()
        assert first.result(60).token_ids == alone(captioner, pixels, 0, LONG)
        assert second.result(60).token_ids == alone(captioner, pixels, 1, LONG)
    finally:
        gate.open_all()
        engine.close()


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_gone_request_stops_within_one_step(captioner, pixels, ending):
    """Cancelled (the client went away) or past its deadline: its rows leave before the next step."""
    engine, gate = gated(captioner)
    try:
        doomed = engine.submit(CaptionRequest(LONG, pixels=pixels[0]))
        kept = engine.submit(CaptionRequest(LONG, pixels=pixels[1]))
        gate.wait_entered(1)  # both prefixes, one step
        assert gate.calls[0][0] == 2
        gate.open(2)
        gate.wait_entered(3)  # two rows decoding
        if ending == "cancel":
            doomed.cancel()
        else:
            doomed.request.deadline = time.monotonic() - 1
        gate.open()
        gate.wait_entered(4)
        assert gate.calls[3] == (1, 1)  # the next step has the kept row only
        with pytest.raises(CaptionFailed) as failure:
            doomed.result(10)
        assert failure.value.status == (CLIENT_GONE if ending == "cancel" else 504)
        gate.open_all()
        assert kept.result(60).token_ids == alone(captioner, pixels, 1, LONG)
        assert all(rows == 1 for rows, _ in gate.calls[3:])
    finally:
        gate.open_all()
        engine.close()


def test_a_full_queue_refuses_with_retry_after(captioner, pixels):
    engine, gate = gated(captioner, max_queued=2)
    try:
        running = engine.submit(CaptionRequest(LONG, pixels=pixels[0]))
        gate.wait_entered(1)  # running: out of the queue
        queued = [engine.submit(CaptionRequest(LONG, pixels=pixels[i])) for i in (1, 2)]
        with pytest.raises(EngineBusy) as busy:
            engine.submit(CaptionRequest(LONG, pixels=pixels[3]))
        assert busy.value.status == 503 and busy.value.retry_after_s >= 1
        gate.open_all()
        for index, handle in enumerate([running, *queued]):
            assert handle.result(60).token_ids == alone(captioner, pixels, index, LONG)
    finally:
        gate.open_all()
        engine.close()


def test_beam_waits_for_rows_and_nothing_overtakes_it(captioner, pixels):
    """A beam request needing more rows than are free waits (FIFO) until rows free up."""
    beam = DecodingOptions(strategy="beam", beam_size=3, max_tokens=4)
    engine, gate = gated(captioner, max_rows=3)
    try:
        first = engine.submit(CaptionRequest(DecodingOptions(max_tokens=3, ignore_stop=True), pixels=pixels[0]))
        gate.wait_entered(1)
        waiting = engine.submit(CaptionRequest(beam, pixels=pixels[1]))
        later = engine.submit(CaptionRequest(DecodingOptions(max_tokens=2), pixels=pixels[2]))
        gate.open_all()
        assert first.result(60).token_ids == alone(captioner, pixels, 0, DecodingOptions(max_tokens=3, ignore_stop=True))
        assert waiting.result(60).token_ids == alone(captioner, pixels, 1, beam)
        assert later.result(60).token_ids == alone(captioner, pixels, 2, DecodingOptions(max_tokens=2))
        assert max(rows for rows, length in gate.calls if length == 1) <= 3
    finally:
        gate.open_all()
        engine.close()


def test_streamed_tokens_make_the_caption(captioner, pixels):
    engine = CaptionEngine(captioner)

    async def run(options):
        handle = engine.submit(CaptionRequest(options, pixels=pixels[2], stream=True))
        events = [event async for event in handle.stream()]
        return events, handle.result()

    try:
        for options in (DecodingOptions(), DecodingOptions(strategy="beam", beam_size=3)):
            events, result = asyncio.run(run(options))
            assert [t for event in events for t in event.token_ids] == result.token_ids
            assert "".join(event.text for event in events).strip() == result.caption
            if options.strategy == "greedy":
                assert len(events) == len(result.token_ids)  # one event per token
            else:
                assert len(events) == 1  # a beam settles its tokens at its end
    finally:
        engine.close()


def test_image_bytes_are_decoded_by_the_engine(captioner, pixels):
    image = random_images(1, seed=5)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    engine = CaptionEngine(captioner)
    try:
        result = engine.caption(CaptionRequest(DecodingOptions(), image=buffer.getvalue()), timeout=60)
        assert result.token_ids == captioner.caption_images([image]).captions[0].token_ids
        assert result.timings_ms.keys() >= {"preprocess", "queue", "encode", "decode", "first_token"}
        with pytest.raises(CaptionFailed) as failure:
            engine.caption(CaptionRequest(DecodingOptions(), image=b"not an image"), timeout=60)
        assert failure.value.status == 400
    finally:
        engine.close()


class Failing:
    """A runtime wrapper whose step raises when a poisoned prefix is in it (a bug one request triggers)."""

    def __init__(self, runtime, poison, fail_batched_once: bool = False):
        self.inner, self.poison, self.fail_batched_once = runtime, poison, fail_batched_once

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, embeds, cache):
        if embeds.shape[1] > 1 and any(np.allclose(to_numpy(row), to_numpy(self.poison), atol=1e-4) for row in embeds):
            raise RuntimeError("poisoned")
        if self.fail_batched_once and embeds.shape[0] > 1 and embeds.shape[1] == 1:
            self.fail_batched_once = False
            raise RuntimeError("a batched step failed once")
        return self.inner.step(embeds, cache)


def test_one_failing_request_costs_no_other(captioner, pixels):
    poison = captioner.runtime.encode(pixels[[5]])[0]
    engine = CaptionEngine(Captioner(Failing(captioner.runtime, poison, fail_batched_once=True),
                                     captioner.tokenizer, captioner.config))
    try:
        handles = [engine.submit(CaptionRequest(LONG, pixels=pixels[i])) for i in (0, 5, 1)]
        with pytest.raises(CaptionFailed) as failure:
            handles[1].result(60)
        assert failure.value.status == 500 and "poisoned" not in failure.value.message
        for index, handle in ((0, handles[0]), (1, handles[2])):
            assert handle.result(60).token_ids == alone(captioner, pixels, index, LONG)
        after = engine.caption(CaptionRequest(DecodingOptions(), pixels=pixels[3]), timeout=60)
        assert after.token_ids == alone(captioner, pixels, 3, DecodingOptions())
    finally:
        engine.close()


def test_close_fails_what_is_left(captioner, pixels):
    engine, gate = gated(captioner)
    handle = engine.submit(CaptionRequest(LONG, pixels=pixels[0]))
    gate.wait_entered(1)
    closer = threading.Thread(target=engine.close)
    closer.start()
    gate.open_all()
    closer.join(60)
    with pytest.raises(CaptionFailed):
        engine.submit(CaptionRequest(LONG, pixels=pixels[0]))
    try:
        assert handle.result(10).token_ids  # finished its step, or failed with 503: never left hanging
    except CaptionFailed as failure:
        assert failure.status == 503


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_rows"):
        EngineConfig(max_rows=0).validate()
    with pytest.raises(ValueError, match="encode_wait_ms"):
        EngineConfig(encode_wait_ms=-1).validate()


def test_a_listener_added_late_still_gets_the_outcome(captioner, pixels):
    engine = CaptionEngine(captioner)
    try:
        handle = engine.submit(CaptionRequest(DecodingOptions(max_tokens=3), pixels=pixels[0], stream=True))
        result = handle.result(60)
        seen = []
        handle.listen(seen.append)  # after the end: the events and the outcome are replayed
        assert [t for event in seen[:-1] for t in event.token_ids] == result.token_ids and seen[-1] is result
    finally:
        engine.close()
