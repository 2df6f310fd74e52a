"""`CaptionEngine`: one scheduler per worker, under every front.

A request (`CaptionRequest`) is admitted into a bounded queue (full: `EngineBusy`, a 503 with
Retry-After), its image decoded on a small thread pool, then encoded together with the images
waiting beside it, and its prefix joins the running decode at the next step (iteration-level, or
continuous, batching: clipcap.decoding.DecodeBatch). Every row keeps its own options; a finished
row leaves at once, and so does one whose client cancelled or whose deadline passed, before the
next step. Token events stream to whoever listens (`CaptionHandle.stream`). All compute runs on the
engine's own thread; fronts wait on handles, from threads (`result`) or from asyncio (`wait`, `stream`).

A failure inside a shared step is not allowed to cost the batch: the step's requests are decoded
again one at a time, so only one that fails alone gets its 500.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import clipcap.arrays as arrays
from clipcap.decoding import DecodeBatch, DecodeSequence, DecodingOptions, new_sequence, stop_ids
from clipcap.images import ImageError

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_rows: int = 16  # rows in the running decode; a beam request holds beam_size of them
    encode_batch: int = 8  # images encoded together at most
    encode_wait_ms: float = 5.0  # an idle engine waits this long for more images to encode together
    max_queued: int = 64  # requests admitted and not yet decoding; one more is refused (EngineBusy: 503)
    decode_threads: int = 2  # images decoded (bytes -> pixels) at once, beside the compute thread

    def validate(self) -> "EngineConfig":
        for name in ("max_rows", "encode_batch", "max_queued", "decode_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"engine {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.encode_wait_ms, (int, float)) or self.encode_wait_ms < 0:
            raise ValueError(f"engine encode_wait_ms must be a number >= 0, got {self.encode_wait_ms!r}")
        return self


@dataclass
class CaptionRequest:
    """One image to caption, however it arrived: every front builds these and nothing else."""

    options: DecodingOptions  # validated against the server's bounds
    image: bytes | None = None  # encoded image bytes, decoded by the engine's pool; or
    pixels: Any = None  # (3, S, S) model input (a numpy array from load_pixels), already preprocessed
    request_id: str = ""  # names the request in log lines
    deadline: float | None = None  # time.monotonic() after which it is dropped (504); None: none
    stream: bool = False  # deliver a TokenEvent per settled token
    preprocess_ms: float = 0.0  # reading and decoding its image before it was submitted (given pixels)


@dataclass
class TokenEvent:
    token_ids: list[int]  # tokens settled since the last event (a beam settles all of them at its end)
    text: str  # the caption text they add (held back while a character is incomplete)


@dataclass
class CaptionResult:
    caption: str  # decoded text, stripped
    token_ids: list[int]  # generated ids, the stop token included when one was produced
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, queue, encode, decode, first_token
    batch_rows: int = 1  # the most rows it shared a decode step with (itself included)


class CaptionFailed(Exception):
    """A request that ends without a caption; `status` is the HTTP status a front answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class EngineBusy(CaptionFailed):
    """The admission queue is full: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int, queued: int):
        super().__init__(503, f"the server is busy ({queued} requests waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection


class CaptionHandle:
    """A submitted request: wait for its result, stream its tokens, or cancel it (within one decode step)."""

    def __init__(self, request: CaptionRequest):
        self.request = request
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._events: list[TokenEvent] = []
        self._listeners: list[Callable[[object], None]] = []
        self._outcome: CaptionResult | CaptionFailed | None = None
        self.cancelled = False
        self.times: dict[str, float] = {"submitted": time.perf_counter()}  # stage marks, perf_counter s

    def cancel(self) -> None:
        """The client went away: the engine frees the request's rows before its next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> CaptionResult:
        """Block until the caption is ready; raises CaptionFailed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.request_id} not finished after {timeout} s")
        if isinstance(self._outcome, CaptionFailed):
            raise self._outcome
        return self._outcome

    async def wait(self) -> CaptionResult:
        """`result` for asyncio; cancelling the awaiting task cancels the request."""
        async for _ in self.stream():
            pass
        return self.result()

    def listen(self, callback: Callable[[object], None]) -> None:
        """`callback` gets every TokenEvent and then the outcome (CaptionResult or CaptionFailed): those already
        emitted at once, from this thread; later ones from the engine's thread as they happen."""
        with self._lock:
            backlog = list(self._events) + ([self._outcome] if self._outcome is not None else [])
            self._listeners.append(callback)
        for event in backlog:
            callback(event)

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The token events as they come; ends when the caption is ready (then `result()`), raises
        CaptionFailed. Cancelling the consuming task, or closing the iterator early, cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            backlog = list(self._events) + ([self._outcome] if self._outcome is not None else [])
            self._listeners.append(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        for event in backlog:
            queue.put_nowait(event)
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, TokenEvent):
                    yield event
                    continue
                finished = True
                if isinstance(event, CaptionFailed):
                    raise event
                return
        finally:
            if not finished:
                self.cancel()

    # -- called by the engine ------------------------------------------------------------------

    def _emit(self, event: TokenEvent) -> None:
        with self._lock:
            self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def _finish(self, outcome: CaptionResult | CaptionFailed) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            listeners = list(self._listeners)
        self._done.set()
        for listener in listeners:
            listener(outcome)


class _Running:
    """A handle in the decode: its sequence, its prefix (to decode it again alone) and its streamed text."""

    def __init__(self, handle: CaptionHandle, sequence: DecodeSequence, prefix: Any):
        self.handle, self.sequence, self.prefix = handle, sequence, prefix
        self.tokens: list[int] = []  # settled so far
        self.text = ""  # their text as streamed
        self.batch_rows = 0  # the most rows in a step it took part in


class CaptionEngine:
    """Admission, batched encode and iteration-level decode over a `Captioner`, on one compute thread."""

    def __init__(self, captioner, config: EngineConfig | None = None,
                 load_pixels: Callable[[bytes], Any] | None = None,
                 on_step: Callable[[int, float], None] | None = None):
        """`load_pixels`: image bytes -> pixels (ImageError for a bad image); default: the captioner's with
        its defaults. `on_step(rows, seconds)`: called after every decode step (metrics)."""
        self.captioner = captioner
        self.runtime = captioner.runtime
        self.config = (config or EngineConfig()).validate()
        self.load_pixels = load_pixels or captioner.load_pixels
        self.on_step = on_step
        self._stop = stop_ids(captioner.config.tokenizer.stop_token_ids, DecodingOptions())
        self._condition = threading.Condition()
        self._waiting: collections.deque[CaptionHandle] = collections.deque()  # pixels ready, not yet encoded
        self._decoding_images = 0  # requests whose image is being decoded
        self._running: dict[int, _Running] = {}  # id(sequence) -> its request
        self._batch = DecodeBatch(self.runtime)
        self._closed = False
        self._image_pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="clipcap-image")
        self._thread = threading.Thread(target=self._loop, name="clipcap-engine", daemon=True)
        self._thread.start()

    # -- the fronts' side ------------------------------------------------------------------------

    def submit(self, request: CaptionRequest) -> CaptionHandle:
        """Admit a request, or raise EngineBusy when the queue is full (nothing is kept of it then)."""
        if (request.image is None) == (request.pixels is None):
            raise ValueError("a CaptionRequest holds either image bytes or pixels")
        handle = CaptionHandle(request)
        with self._condition:
            if self._closed:
                raise CaptionFailed(503, "the server is shutting down")
            queued = len(self._waiting) + self._decoding_images
            if queued >= self.config.max_queued:
                raise EngineBusy(retry_after_s=1, queued=queued)
            if request.pixels is None:
                self._decoding_images += 1
            else:
                handle.times["pixels"] = handle.times["submitted"]
                self._waiting.append(handle)
                self._condition.notify()
        if request.pixels is None:
            self._image_pool.submit(self._decode_image, handle)
        return handle

    def caption(self, request: CaptionRequest, timeout: float | None = None) -> CaptionResult:
        return self.submit(request).result(timeout)

    def close(self) -> None:
        """Stop taking requests, fail those not finished (503), and end the compute thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()
        self._image_pool.shutdown(wait=True)

    def _decode_image(self, handle: CaptionHandle) -> None:
        try:
            pixels = self.load_pixels(handle.request.image)
        except ImageError as error:
            outcome = CaptionFailed(400, str(error))
        except Exception:  # a bug must cost one request
            logger.exception("request %s: unexpected error while decoding its image", handle.request.request_id)
            outcome = CaptionFailed(500, "internal error while reading the image (logged on the server)")
        else:
            outcome = None
            handle.request.pixels = pixels
            handle.request.image = None  # the bytes are not kept once decoded
        handle.times["pixels"] = time.perf_counter()
        with self._condition:
            self._decoding_images -= 1
            if outcome is None:
                self._waiting.append(handle)
                self._condition.notify()
        if outcome is not None:
            handle._finish(outcome)

    # -- the compute thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            admitted = self._next_admissions()
            if admitted is None:
                break
            try:
                self._drop_gone()
                if admitted:
                    self._start(admitted)
                if self._batch.sequences:
                    self._step()
            except Exception:  # never the engine: requests decode again alone (`_recover`)
                logger.exception("engine: a batched step failed; decoding its requests one at a time")
                self._recover()
        self._fail_all(CaptionFailed(503, "the server is shutting down"))

    def _next_admissions(self) -> list[CaptionHandle] | None:
        """The requests to start now (FIFO, as many as fit the free rows, up to encode_batch); waits while
        idle, and up to encode_wait_ms for company when the decode is empty. None: closed."""
        config = self.config
        with self._condition:
            while not self._closed and not self._waiting and not self._batch.sequences:
                self._condition.wait()
            if self._closed:
                return None
            if not self._batch.sequences and self._waiting:
                deadline = self._waiting[0].times["pixels"] + config.encode_wait_ms / 1e3
                while (len(self._waiting) < config.encode_batch and self._decoding_images and not self._closed
                       and time.perf_counter() < deadline):
                    self._condition.wait(max(0.0, deadline - time.perf_counter()))
            admitted, free = [], config.max_rows - self._batch.rows
            while self._waiting and len(admitted) < config.encode_batch:
                rows = _rows(self._waiting[0].request.options)
                if rows > free and (self._batch.sequences or admitted):
                    break  # FIFO: it starts when rows free up (alone, if it needs more than max_rows)
                admitted.append(self._waiting.popleft())
                free -= rows
            return admitted

    def _start(self, handles: list[CaptionHandle]) -> None:
        """Encode the images of `handles` together and join their prefixes to the running decode."""
        handles = [h for h in handles if not self._ended(h)]
        if not handles:
            return
        start = time.perf_counter()
        for handle in handles:
            handle.times["encode"] = start
        try:
            pixels = [h.request.pixels for h in handles]
            prefix = self.runtime.encode(arrays.namespace(*pixels).stack(pixels))
        except Exception:
            if len(handles) == 1:
                logger.exception("request %s: captioning failed (encoding its image)", handles[0].request.request_id)
                handles[0]._finish(CaptionFailed(500, "captioning failed: internal error (logged on the server)"))
                return
            logger.exception("engine: encoding %d images together failed; encoding them one by one", len(handles))
            for handle in handles:
                self._start([handle])
            return
        encoded = time.perf_counter()
        running = []
        for handle, row in zip(handles, prefix):
            handle.times["decode"] = encoded
            handle.request.pixels = None  # not needed past the encoder
            running.append(_Running(handle, self._sequence(handle.request), row[None]))
        for entry in running:
            self._running[id(entry.sequence)] = entry
        finished = self._batch.add([entry.sequence for entry in running], prefix)
        self._settle([entry.sequence for entry in running], finished, len(running))

    def _step(self) -> None:
        start = time.perf_counter()
        rows = self._batch.rows
        live = list(self._batch.sequences)
        finished = self._batch.step()
        if self.on_step is not None:
            self.on_step(rows, time.perf_counter() - start)
        self._settle(live, finished, rows)

    def _settle(self, advanced: list[DecodeSequence], finished: list[DecodeSequence], rows: int) -> None:
        """Stream what the advanced sequences (a step of `rows` rows) settled; finish the ones done."""
        now = time.perf_counter()
        for sequence in advanced:
            entry = self._running[id(sequence)]
            entry.batch_rows = max(entry.batch_rows, rows)
            if sequence.emitted:
                entry.handle.times.setdefault("first_token", now)
                if entry.handle.request.stream:
                    self._stream(entry, sequence.emitted)
        for sequence in finished:
            entry = self._running.pop(id(sequence))
            token_ids = sequence.result()
            handle = entry.handle
            handle._finish(CaptionResult(self.captioner.tokenizer.decode(token_ids), token_ids, _timings(handle, now),
                                         entry.batch_rows))

    def _stream(self, entry: _Running, tokens: list[int]) -> None:
        """A TokenEvent of the newly settled tokens and the text they complete (the tokenizer holds back an
        incomplete character until its last byte comes)."""
        entry.tokens += tokens
        text = self.captioner.tokenizer.decode(entry.tokens)
        delta = text[len(entry.text):] if text.startswith(entry.text) else ""
        entry.text = text if text.startswith(entry.text) else entry.text
        entry.handle._emit(TokenEvent(list(tokens), delta))

    def _drop_gone(self) -> None:
        """Free the rows of cancelled and expired requests before the next step."""
        leaving = [entry for entry in self._running.values() if self._ended(entry.handle)]
        if leaving:
            self._batch.remove([entry.sequence for entry in leaving])
            for entry in leaving:
                del self._running[id(entry.sequence)]

    def _ended(self, handle: CaptionHandle) -> bool:
        """Cancelled or past its deadline: finished with its error (the caller frees its rows)."""
        if handle.cancelled:
            handle._finish(CaptionFailed(CLIENT_GONE, "the client closed the request"))
            return True
        deadline = handle.request.deadline
        if deadline is not None and time.monotonic() > deadline:
            handle._finish(CaptionFailed(504, "the request's deadline passed before its caption was ready"))
            return True
        return False

    def _recover(self) -> None:
        """After a failed shared step: each request of the batch decoded again alone; one that fails alone,
        or that already streamed tokens, gets its 500."""
        entries = list(self._running.values())
        self._running.clear()
        self._batch = DecodeBatch(self.runtime)
        for entry in entries:
            handle = entry.handle
            if entry.tokens or handle.done:
                handle._finish(CaptionFailed(500, "captioning failed: internal error (logged on the server)"))
                continue
            sequence = self._sequence(handle.request)
            alone = DecodeBatch(self.runtime)
            try:
                alone.add([sequence], entry.prefix)
                while alone.sequences:
                    alone.step()
            except Exception:
                logger.exception("request %s: captioning failed", handle.request.request_id)
                handle._finish(CaptionFailed(500, "captioning failed: internal error (logged on the server)"))
                continue
            token_ids = sequence.result()
            handle._finish(CaptionResult(self.captioner.tokenizer.decode(token_ids), token_ids,
                                         _timings(handle, time.perf_counter())))

    def _sequence(self, request: CaptionRequest) -> DecodeSequence:
        options = request.options
        max_tokens = options.max_tokens or self.captioner.config.max_tokens
        stop = self._stop if not options.ignore_stop else ()
        return new_sequence(options, stop, max_tokens, options.seed)

    def _fail_all(self, failure: CaptionFailed) -> None:
        with self._condition:
            waiting = list(self._waiting)
            self._waiting.clear()
        for handle in waiting + [entry.handle for entry in self._running.values()]:
            handle._finish(failure)
        self._running.clear()


def _rows(options: DecodingOptions) -> int:
    return options.beam_size if options.strategy == "beam" else 1


def _timings(handle: CaptionHandle, end: float) -> dict[str, float]:
    """Per request, ms: preprocess (reading and decoding its image), queue (waiting to be encoded), encode,
    decode (joining the decode to its last token), first_token (from submission)."""
    times = handle.times
    timings = {"preprocess": handle.request.preprocess_ms + (times["pixels"] - times["submitted"]) * 1e3}
    for name, (start, stop) in {"queue": ("pixels", "encode"), "encode": ("encode", "decode")}.items():
        timings[name] = (times[stop] - times[start]) * 1e3
    timings["decode"] = (end - times["decode"]) * 1e3
    if "first_token" in times:
        timings["first_token"] = (times["first_token"] - times["submitted"]) * 1e3
    return {name: round(value, 3) for name, value in timings.items()}
