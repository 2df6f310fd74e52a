"""Serving: everything the TorchServe handler does, written so it runs (and is tested) without TorchServe.

Each request is checked and preprocessed on its own (content type, body size, decoding options,
image decoding, resize/normalise), so a bad request gets its own 4xx answer (a bug, its own 500)
and never fails the others; the good ones go to the worker's `CaptionEngine` (clipcap.serving.engine),
which decodes every running request together step by step, each with its own options, and
isolates a failure to the request that causes it. A full engine queue answers 503 with
Retry-After; a request past `handler.deadline_s` answers 504 and stops consuming decode steps. The
handler's settings (`ServingConfig`) are clipcap.serving.config's; clipcap.export.mar packs a
bundle, the handler and `model-config.yaml` into a `.mar`.

Requests (TorchServe's own parsing already split multipart forms; the handler has it pass JSON on as bytes):
- raw image bytes as the body (Content-Type image/*, application/octet-stream or none);
- multipart/form-data: one file part (the image) plus optional text fields named after `REQUEST_OPTIONS`;
- application/json: {"image": "<base64>", "decoding": "beam", "beam_size": 3, ...};
- application/x-www-form-urlencoded whose body is an image of an accepted format (what `curl --data-binary
  @photo.jpg` sends without -H Content-Type) is read as a raw body; any other form body is refused (415).
Query-string parameters, where TorchServe passes them on, are fields like a form's. Every option is
a JSON scalar, all of them within `max_options_bytes`; a name given twice, an unknown name, deep
JSON are refused; a message quotes client input only through clipcap.quoting. Every log line about
a request names it by TorchServe's request id (the X-Request-ID of its reply) and the client's own.
URLs are never fetched: an image arrives in the request or not at all.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import http
import io
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap.decoding import REQUEST_OPTIONS, DecodingError, DecodingOptions
from clipcap.serving.engine import CaptionEngine, CaptionFailed, CaptionRequest, CaptionResult, EngineBusy, EngineConfig
from clipcap.images import ImageError, open_image
from clipcap.quoting import quote, quote_names
from clipcap.serving.form import BODY, FORM_TYPE, JSON_TYPE, MULTIPART_TYPE, RAW_TYPES, Form, Part, read_form
from clipcap.serving.config import MODEL_CONFIG_FILE, ServingConfig, ServingConfigError, worker_threads
from clipcap.runtimes.base import set_compute_threads as runtime_threads

if TYPE_CHECKING:
    from clipcap.captioner import Captioner
    from clipcap.serving.engine import CaptionHandle

logger = logging.getLogger(__name__)

# TorchServe's own routing parameter, passed to the handler as a field by /invocations?model_name=...
TORCHSERVE_PARAMETERS = ("model_name",)
# ClipcapBatchSize's bucket bounds (le=): batch sizes are small integers, so powers of two, not seconds.
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(11))  # 1, 2, 4, ... 1024
HOW_TO_SEND = ('send the image as the raw body (Content-Type: image/png, image/jpeg, ...), as a multipart/form-data '
               'file part, or as JSON {"image": "<base64>"}')


def resolve_device(device: str, gpu_id: int | None) -> str:
    """The torch device for a worker: 'auto' and 'cuda' follow the GPU TorchServe assigned (gpu_id)."""
    if device == "auto":
        if gpu_id is None:
            return "cpu"
        try:
            import torch  # a GPU worker; the core install (no torch) runs on the CPU
        except ImportError:
            return "cpu"
        return f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and gpu_id is not None:
        return f"cuda:{gpu_id}"
    return device


class ServingError(Exception):
    """A request the server refuses: an HTTP status and a message fit for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.request_id = ""  # set by parse_batch: the request_label its log lines carry
        self.headers: dict[str, str] = {}  # to send with the answer (Retry-After)

    def reply(self) -> "Reply":
        # The same shape as TorchServe's own errors, so clients parse one format.
        kind = http.HTTPStatus(self.status).phrase.replace(" ", "") if self.status in _KNOWN else "ClientClosedRequest"
        return Reply(self.status, {"code": self.status, "type": kind, "message": self.message}, dict(self.headers))


_KNOWN = {status.value for status in http.HTTPStatus}


@dataclass
class Reply:
    status: int  # HTTP status for this request
    body: dict  # JSON response body
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (Retry-After)
    batch_rows: int = 0  # a caption: the most rows its request shared a decode step with (metrics; not sent)

    @property
    def phrase(self) -> str:
        return http.HTTPStatus(self.status).phrase if self.status in _KNOWN else "Client Closed Request"


def batch_size_bucket(size: int) -> int:
    """The smallest of BATCH_SIZE_BUCKETS holding `size` (the last one for anything larger)."""
    return next((bound for bound in BATCH_SIZE_BUCKETS if size <= bound), BATCH_SIZE_BUCKETS[-1])


@dataclass
class BatchStats:
    """What a set of answered requests cost; the fronts turn it into metrics."""

    batch_size: int  # requests, refused ones included
    captioned: int  # requests that got a caption
    tokens: int  # tokens generated over them
    timings_ms: dict[str, float]  # preprocess / encode / decode per request, summed
    rows: list[int] = field(default_factory=list)  # per caption: the most rows it shared a decode step with

    @classmethod
    def of(cls, replies: list["Reply"]) -> "BatchStats":
        captions = [reply for reply in replies if reply.status == 200]
        totals = {stage: sum(reply.body["timings_ms"].get(stage, 0.0) for reply in captions)
                  for stage in ("preprocess", "encode", "decode")}
        return cls(len(replies), len(captions), sum(len(reply.body["token_ids"]) for reply in captions), totals,
                   [reply.batch_rows for reply in captions])


class CaptionService:
    """Request parsing and validation, and captioning through the worker's one `CaptionEngine`."""

    def __init__(self, captioner: "Captioner", config: ServingConfig):
        self.captioner = captioner
        self.config = config
        self.engine = CaptionEngine(captioner, EngineConfig(
            max_rows=config.batch_rows, encode_batch=config.encode_batch, encode_wait_ms=config.encode_wait_ms,
            max_queued=config.max_queued, decode_threads=config.decode_threads))
        # The most tokens a request may ask for: the configured cap, never beyond the model's positions.
        self.token_limit = min(config.max_tokens or captioner.config.max_tokens, captioner.token_limit)
        base = captioner.default_options().replace(max_tokens=min(captioner.config.max_tokens, self.token_limit))
        try:
            self.defaults = DecodingOptions.from_request(config.defaults, base).validate(self.token_limit)
        except DecodingError as error:
            raise ServingConfigError(f"{MODEL_CONFIG_FILE}: handler.defaults: {error}") from None
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="clipcap-decode")

    @classmethod
    def from_archive(cls, model_dir: str | Path, model_config: dict | None, gpu_id: int | None = None,
                     ) -> "CaptionService":
        """Open the bundle unpacked from a .mar, with the settings of its model-config.yaml; this process's
        compute threads are set first (`worker_threads` of handler.threads and maxWorkers)."""
        from clipcap.captioner import Captioner

        settings = model_config or {}
        config = ServingConfig.from_dict(settings.get("handler"))
        workers = settings.get("maxWorkers")  # absent: TorchServe starts a worker per core
        set_compute_threads(worker_threads(config.threads, workers if isinstance(workers, int) else os.cpu_count()),
                            f"handler.threads {config.threads}, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}, "
                            f"maxWorkers {workers}")
        captioner = Captioner.from_path(Path(model_dir) / config.bundle, backend=config.backend,
                                        device=resolve_device(config.device, gpu_id))
        service = cls(captioner, config)
        service.warm_up(settings.get("batchSize", 1))
        return service

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Caption a built-in image as a request is (parse, then caption_batch) in a batch of each size of
        `warm_up_sizes(max_batch_size)`, so the first requests do not pay for the runtime's first calls
        (kernel selection, allocator, thread pools: ~0.5 s against ~4 ms after, on TorchServe). A worker calls
        this before it reports ready; a warm-up caption that fails raises. Returns the sizes run."""
        start = time.perf_counter()
        sizes = warm_up_sizes(max_batch_size)
        image = warm_up_image()
        for size in sizes:
            requests = self.parse_batch([read_form({"Content-Type": "image/png"}, image)] * size)
            replies, _ = self.caption_batch(requests)
            failed = [reply for reply in replies if reply.status != 200]
            if failed:
                raise RuntimeError(f"warm-up caption of a batch of {size} failed: {failed[0].body}")
        logger.info("warmed up: batches of %s in %.0f ms", ", ".join(map(str, sizes)), (time.perf_counter() - start) * 1e3)
        return sizes

    # -- requests -------------------------------------------------------------------------------

    def parse_batch(self, forms: list[Form], request_ids: list[str] | None = None) -> list[CaptionRequest | ServingError]:
        """Requests as Forms and the server's request ids; each result carries its request's `request_label`
        for the log lines.

        The forms are read on `handler.decode_threads` threads (Pillow's decoders release the GIL), each
        on its own: at most that many images are decoded at once, so memory stays that many times one
        image's bound."""
        ids = [request_label(request_ids[i] if request_ids else str(i), f.headers) for i, f in enumerate(forms)]
        return list(self._decode_pool.map(self._parse_isolated, forms, ids))

    def _parse_isolated(self, form: Form, request_id: str) -> CaptionRequest | ServingError:
        return self._isolated(lambda: self.parse(form), request_id)

    def _isolated(self, read, request_id: str) -> CaptionRequest | ServingError:
        try:
            result = read()
        except ServingError as error:
            logger.info("request %s refused: %d %s", request_id, error.status, error.message)
            result = error
        except Exception:  # a bug must cost one request, never the batch or the worker
            logger.exception("request %s: unexpected error while reading it", request_id)
            result = ServingError(500, "internal error while reading the request (logged on the server)")
        result.request_id = request_id
        return result

    def parse(self, form: Form) -> CaptionRequest:
        """One request -> its checked image as pixels and its decoding options, or ServingError."""
        start = time.perf_counter()
        if all(_is_empty(part.value) for part in form.parts):
            raise ServingError(400, f"empty request: {HOW_TO_SEND}")
        _refuse_repeated_parts(form)
        if form.content_type == MULTIPART_TYPE:
            payload, options = self._from_multipart(form)
        elif form.content_type == JSON_TYPE:
            payload, options = self._from_json(_value(form.part(BODY)))
            fields = self._fields(form, BODY)
            _refuse_given_twice(set(options) & set(fields))
            options.update(fields)
        elif form.content_type.startswith("image/") or form.content_type in RAW_TYPES:
            payload, options = _value(form.part(BODY)), self._fields(form, BODY)
            if not isinstance(payload, (bytes, bytearray)):
                raise ServingError(400, f"no request body: {HOW_TO_SEND}")
        elif form.content_type == FORM_TYPE:
            payload, options = self._form_image(_value(form.part(BODY))), self._fields(form, BODY)
        else:
            raise ServingError(415, f"content type {quote(form.content_type)} is not accepted: {HOW_TO_SEND}")
        return self.build(payload, options, start)

    def build(self, image: bytes, options: dict, start: float | None = None) -> CaptionRequest:
        """An image's bytes and its options (the JSON request form's keys), however a front read them off the
        wire -> a checked CaptionRequest, or ServingError. The options are checked before the image is read."""
        start = time.perf_counter() if start is None else start
        self._check_options(options)
        try:
            options = DecodingOptions.from_request(options, self.defaults).validate(self.token_limit)
        except DecodingError as error:
            raise ServingError(400, str(error)) from None
        self._check_size(len(image))
        try:  # here, in the request's own parse: a failure is this request's alone
            pixels = self.captioner.load_pixels(bytes(image), self.config.formats, self.config.max_image_pixels,
                                                self.config.max_image_bytes)
        except ImageError as error:
            raise ServingError(400, str(error)) from None
        return CaptionRequest(options, pixels=pixels, preprocess_ms=(time.perf_counter() - start) * 1e3,
                              deadline=None if self.config.deadline_s is None else time.monotonic() + self.config.deadline_s)

    async def parse_async(self, form: Form, request_id: str) -> CaptionRequest | ServingError:
        """One request parsed on the service's decode threads (at most decode_threads images decode at once)."""
        label = request_label(request_id, form.headers)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._parse_isolated, form, label)

    async def build_async(self, image: bytes, options: dict, request_id: str) -> CaptionRequest | ServingError:
        """`build_isolated` on the service's decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self.build_isolated, image,
                                                                options, request_id)

    def build_isolated(self, image: bytes, options: dict, request_id: str) -> CaptionRequest | ServingError:
        """`build` for a front: a refusal comes back (logged) instead of raised, a bug as its own 500."""
        return self._isolated(lambda: self.build(image, options), request_id)

    def _form_image(self, payload: Any) -> bytes:
        """The body of a form-urlencoded request when it is an image of an accepted format (its header is
        read, nothing decoded), else 415: an image sent with curl's default content type is captioned."""
        if isinstance(payload, (bytes, bytearray)) and payload:
            try:
                open_image(bytes(payload), self.config.formats, self.config.max_image_pixels).close()
                return payload
            except ImageError as error:
                reason = f"its body is not an image this server accepts ({error})"
        else:
            reason = "it holds no image"
        raise ServingError(415, f"content type {FORM_TYPE} (curl's default for -d and --data-binary) is not "
                                f"accepted: {reason}; {HOW_TO_SEND}, e.g. curl -H 'Content-Type: image/jpeg' "
                                f"--data-binary @photo.jpg")

    def _from_json(self, body: Any) -> tuple[bytes, dict]:
        if isinstance(body, (bytes, bytearray)):  # the handler has TorchServe hand on the bytes: read here
            body = self._read_json(body)
        if not isinstance(body, dict):
            raise ServingError(400, 'a JSON body must be an object: {"image": "<base64>", "decoding": ..., ...}')
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise ServingError(400, 'a JSON body needs "image": a non-empty base64 string of the image bytes')
        self._check_size(len(image) * 3 // 4 - image[-2:].count("="))  # the decoded size, known before decoding
        try:
            payload = base64.b64decode(image, validate=True)
        except ValueError as error:  # binascii.Error, or text that is not ASCII
            raise ServingError(400, f'"image" is not valid base64 ({error})') from None
        return payload, {key: value for key, value in body.items() if key != "image"}

    def _read_json(self, raw: bytes) -> Any:
        """The body's JSON, refused before parsing when it cannot fit the limits; a key given twice is refused."""
        largest = 4 * -(-self.config.max_body_bytes // 3) + self.config.max_options_bytes + 64  # + "image" and braces
        if len(raw) > largest:
            raise ServingError(413, f"JSON body is {len(raw)} bytes, over the limit of {largest} bytes "
                                    f"(a base64 image of handler.max_body_bytes and handler.max_options_bytes of options)")
        try:
            return json.loads(raw, object_pairs_hook=_object_without_repeated_keys)
        except RecursionError:  # json's own limit on nesting: a client's "[[[[..." must not be a 500
            raise ServingError(400, "body is not valid JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError: their messages hold positions only
            raise ServingError(400, f"body is not valid JSON ({error})") from None

    def _from_multipart(self, form: Form) -> tuple[bytes, dict]:
        files = [part.name for part in form.parts if part.is_file]
        if len(files) != 1:
            raise ServingError(400, f"a multipart request needs exactly one file part holding the image besides the "
                                    f"option fields ({', '.join(REQUEST_OPTIONS)}); got {len(files)} file parts"
                                    + (f": {quote_names(files)}" if files else ""))
        payload = _value(form.part(files[0]))
        if not isinstance(payload, (bytes, bytearray)):
            raise ServingError(400, f"multipart part {quote(files[0])} holds no image bytes")
        return payload, self._fields(form, files[0])

    def _fields(self, form: Form, payload: str) -> dict:
        """The form's text fields, every part but the `payload` one: multipart fields, and query-string
        parameters where the route passes them (TorchServe's /invocations and /{model}/predict; its
        /predictions drops them)."""
        fields = {}
        for part in form.parts:
            name, value = part.name, part.value
            if name == payload or name in TORCHSERVE_PARAMETERS:
                continue
            if not isinstance(value, (bytes, bytearray, str)):
                raise ServingError(400, f"field {quote(name)} is not text")
            if len(value) > self.config.max_options_bytes:
                raise ServingError(413, f"field {quote(name)} is {len(value)} bytes, over the limit of "
                                        f"{self.config.max_options_bytes} bytes (handler.max_options_bytes)")
            fields[name] = _form_value(name, value)
        return fields

    def _check_options(self, options: dict) -> None:
        """Every option value a JSON scalar, and all of them within handler.max_options_bytes."""
        size = 0
        for name, value in options.items():
            if not isinstance(value, (str, int, float)):  # null too (max_tokens: null would lift the cap); bool: validate
                raise ServingError(400, f"option {quote(name)} must be a string or a number, got {quote(value)}")
            # A number counts 24 characters: a valid one has fewer; JSON caps an integer at 4300 digits.
            size += len(str(name)) + (len(value) if isinstance(value, str) else 24)
        if size > self.config.max_options_bytes:
            raise ServingError(413, f"the options are {size} bytes, over the limit of "
                                    f"{self.config.max_options_bytes} bytes (handler.max_options_bytes)")

    def _check_size(self, size: int) -> None:
        if size > self.config.max_body_bytes:
            raise ServingError(413, f"image is {size} bytes, over the limit of {self.config.max_body_bytes} bytes")

    # -- captioning -----------------------------------------------------------------------------

    def submit(self, request: CaptionRequest | ServingError) -> "CaptionHandle | ServingError":
        """Hand a parsed request to the engine; a refusal (a bad request, a full queue) comes back as ServingError."""
        if isinstance(request, ServingError):
            return request
        try:
            return self.engine.submit(request)
        except EngineBusy as busy:
            logger.warning("request %s refused: %d %s", request.request_id, busy.status, busy.message)
            return _refusal(busy, request.request_id)

    def reply(self, handle: "CaptionHandle | ServingError", result: CaptionResult | CaptionFailed) -> Reply:
        """The answer to a finished request."""
        if isinstance(result, CaptionFailed):
            if result.status >= 500:
                logger.warning("request %s failed: %d %s", handle.request.request_id, result.status, result.message)
            else:
                logger.info("request %s ended: %d %s", handle.request.request_id, result.status, result.message)
            return _refusal(result, handle.request.request_id).reply()
        return Reply(200, {"caption": result.caption, "token_ids": result.token_ids, "timings_ms": result.timings_ms},
                     batch_rows=result.batch_rows)

    def caption_batch(self, requests: list[CaptionRequest | ServingError]) -> tuple[list[Reply], BatchStats]:
        """Caption every good request of a batch (they decode together with whatever else is running) and
        wait for all of them: TorchServe's synchronous handler."""
        handles = [self.submit(request) for request in requests]
        replies = []
        for handle in handles:
            if isinstance(handle, ServingError):
                replies.append(handle.reply())
                continue
            try:
                replies.append(self.reply(handle, handle.result()))
            except CaptionFailed as failure:
                replies.append(self.reply(handle, failure))
        return replies, BatchStats.of(replies)

    async def caption(self, request: CaptionRequest | ServingError) -> Reply:
        """One request's reply, awaited; cancelling the awaiting task (the client went away) cancels it."""
        handle = self.submit(request)
        if isinstance(handle, ServingError):
            return handle.reply()
        try:
            result = await handle.wait()
        except CaptionFailed as failure:
            return self.reply(handle, failure)
        return self.reply(handle, result)

    def close(self) -> None:
        self.engine.close()


def _refusal(failure: CaptionFailed, request_id: str) -> ServingError:
    error = ServingError(failure.status, failure.message)
    error.request_id = request_id
    if isinstance(failure, EngineBusy):
        error.headers["Retry-After"] = str(failure.retry_after_s)
    return error


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a worker warms up with: the powers of two up to `max_batch_size`, and that size."""
    max_batch_size = max(1, max_batch_size)
    sizes = [bound for bound in BATCH_SIZE_BUCKETS if bound <= max_batch_size]
    return sizes + ([max_batch_size] if max_batch_size > sizes[-1] else [])


@functools.cache
def warm_up_image() -> bytes:
    """A built-in 64x64 PNG (colour gradients with a square): decoded, preprocessed and captioned at warm-up."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[16:48, 16:48] = (230, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def set_compute_threads(threads: int, why: str) -> None:
    """This process's compute threads, before a runtime is opened (clipcap.runtimes.set_compute_threads);
    logged, with `why`."""
    runtime_threads(threads)
    logger.info("compute threads: %d (%s)", threads, why)


def request_label(request_id: str, headers: dict) -> str:
    """How log lines name a request: the server's id (TorchServe answers it as X-Request-ID), and the
    client's own X-Request-ID, quoted, when it sent one."""
    client = next((v for k, v in headers.items() if k.lower() == "x-request-id" and isinstance(v, str)), None)
    return request_id if client is None else f"{request_id} (X-Request-ID {quote(client, 64)})"


def _refuse_repeated_parts(form: Form) -> None:
    repeated = [name for name, count in Counter(part.name for part in form.parts).items() if count > 1]
    if repeated:
        raise ServingError(400, f"part(s) or field(s) {quote_names(repeated)} sent more than once: send each once "
                                f"(a query-string parameter counts as a field)")


def _refuse_given_twice(names: set) -> None:
    if names:
        raise ServingError(400, f"option(s) {quote_names(sorted(names))} given twice, in the JSON body and as a "
                                f"field: give each once")


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = [key for key, count in Counter(keys).items() if count > 1]
        raise ServingError(400, f"JSON key(s) {quote_names(repeated)} given more than once: give each once")
    return dict(pairs)


def _value(part: Part | None) -> Any:
    return None if part is None else part.value


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0)


def _form_value(name: str, value: Any) -> Any:
    """A form field is text: read it as a JSON scalar ('3' -> 3, '0.9' -> 0.9), else keep the string."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ServingError(400, f"field {quote(name)} is not UTF-8 text") from None
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value
