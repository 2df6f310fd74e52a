"""Serving: everything the TorchServe handler does, written so it runs (and is tested) without TorchServe.

A TorchServe batch arrives as one row per HTTP request. Each row is checked and preprocessed on
its own (content type, body size, decoding options, image decoding, resize/normalise), so a bad
request gets its own 4xx answer (a bug, its own 500) and never fails the others; the good rows
are captioned together, one batched decode per distinct set of decoding options. If a batched
decode raises, its requests are captioned one by one, so only the failing one answers 500. The
handler's settings (`ServingConfig`) are clipcap.serving_config's; clipcap.export.mar packs a
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

import base64
import dataclasses
import functools
import http
import io
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipcap.decoding import REQUEST_OPTIONS, DecodingError, DecodingOptions
from clipcap.images import ImageError, open_image
from clipcap.quoting import quote, quote_names
from clipcap.serving_config import MODEL_CONFIG_FILE, ServingConfig, ServingConfigError, worker_threads

if TYPE_CHECKING:
    from clipcap.captioner import CaptionBatch, Captioner

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FORM_TYPE = "application/x-www-form-urlencoded"  # curl's default for -d / --data-binary: an image body is sniffed
RAW_TYPES = ("application/octet-stream", "")  # plus every image/*: the bytes, not the header, decide the format
# TorchServe's own routing parameter, passed to the handler as a field by /invocations?model_name=...
TORCHSERVE_PARAMETERS = ("model_name",)
# The handler lists every part and field name of a request here: TorchServe's row keeps one per name.
PART_NAMES = "clipcap-part-names"
# ClipcapBatchSize's bucket bounds (le=): batch sizes are small integers, so powers of two, not seconds.
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(11))  # 1, 2, 4, ... 1024
HOW_TO_SEND = ('send the image as the raw body (Content-Type: image/png, image/jpeg, ...), as a multipart/form-data '
               'file part, or as JSON {"image": "<base64>"}')


def resolve_device(device: str, gpu_id: int | None) -> str:
    """The torch device for a worker: 'auto' and 'cuda' follow the GPU TorchServe assigned (gpu_id)."""
    if device == "auto":
        import torch

        return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
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

    def reply(self) -> "Reply":
        # The same shape as TorchServe's own errors, so clients parse one format.
        kind = http.HTTPStatus(self.status).phrase.replace(" ", "")
        return Reply(self.status, {"code": self.status, "type": kind, "message": self.message})


@dataclass
class Reply:
    status: int  # HTTP status for this request
    body: dict  # JSON response body

    @property
    def phrase(self) -> str:
        return http.HTTPStatus(self.status).phrase


@dataclass
class ImageRequest:
    """One request that passed every check, its image already preprocessed (the decoded image is not kept)."""

    pixels: torch.Tensor  # (3, S, S) model input
    options: DecodingOptions  # validated against the server's bounds
    preprocess_ms: float  # reading, checking, decoding and preprocessing this request's image
    request_id: str = ""  # set by parse_batch: the request_label its log lines carry


def batch_size_bucket(size: int) -> int:
    """The smallest of BATCH_SIZE_BUCKETS holding `size` (the last one for anything larger)."""
    return next((bound for bound in BATCH_SIZE_BUCKETS if size <= bound), BATCH_SIZE_BUCKETS[-1])


@dataclass
class BatchStats:
    """What one TorchServe batch cost; the handler turns it into metrics."""

    batch_size: int  # requests in the batch, refused ones included
    captioned: int  # requests that got a caption
    tokens: int  # tokens generated over the batch
    timings_ms: dict[str, float]  # preprocess (per request) / encode / decode (per decode run), summed


class CaptionService:
    """Request parsing, validation and batched captioning over a `Captioner`."""

    def __init__(self, captioner: "Captioner", config: ServingConfig):
        self.captioner = captioner
        self.config = config
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
            requests = self.parse_batch([{"body": image}] * size, [{"Content-Type": "image/png"}] * size)
            replies, _ = self.caption_batch(requests)
            failed = [reply for reply in replies if reply.status != 200]
            if failed:
                raise RuntimeError(f"warm-up caption of a batch of {size} failed: {failed[0].body}")
        logger.info("warmed up: batches of %s in %.0f ms", ", ".join(map(str, sizes)), (time.perf_counter() - start) * 1e3)
        return sizes

    # -- requests -------------------------------------------------------------------------------

    def parse_batch(self, rows: list[dict], headers: list[dict], request_ids: list[str] | None = None,
                    ) -> list[ImageRequest | ServingError]:
        """TorchServe rows (one dict per request: part name -> value), their request headers and the
        server's request ids; each result carries its request's `request_label` for the log lines.

        The rows are read on `handler.decode_threads` threads (Pillow's decoders release the GIL), each
        on its own: at most that many images are decoded at once, so memory stays that many times one
        image's bound."""
        ids = [request_label(request_ids[i] if request_ids else str(i), h) for i, h in enumerate(headers)]
        return list(self._decode_pool.map(self._parse_isolated, rows, headers, ids))

    def _parse_isolated(self, row: dict, headers: dict, request_id: str) -> ImageRequest | ServingError:
        try:
            result = self.parse(row, headers)
        except ServingError as error:
            logger.info("request %s refused: %d %s", request_id, error.status, error.message)
            result = error
        except Exception:  # a bug must cost one request, never the batch or the worker
            logger.exception("request %s: unexpected error while reading it", request_id)
            result = ServingError(500, "internal error while reading the request (logged on the server)")
        result.request_id = request_id
        return result

    def parse(self, row: dict, headers: dict) -> ImageRequest:
        """One request -> a checked image and decoding options, or ServingError."""
        start = time.perf_counter()
        if all(_is_empty(value) for value in row.values()):
            raise ServingError(400, f"empty request: {HOW_TO_SEND}")
        _refuse_repeated_parts(headers)
        content_type = _content_type(headers)
        if content_type == MULTIPART_TYPE:
            payload, options = self._from_form(row, headers)
        elif content_type == JSON_TYPE:
            payload, options = self._from_json(row.get("body"))
            fields = self._fields(row, "body")
            _refuse_given_twice(set(options) & set(fields))
            options.update(fields)
        elif content_type.startswith("image/") or content_type in RAW_TYPES:
            payload, options = row.get("body"), self._fields(row, "body")
            if not isinstance(payload, (bytes, bytearray)):
                raise ServingError(400, f"no request body: {HOW_TO_SEND}")
        elif content_type == FORM_TYPE:
            payload, options = self._form_image(row), self._fields(row, "body")
        else:
            raise ServingError(415, f"content type {quote(content_type)} is not accepted: {HOW_TO_SEND}")
        self._check_options(options)
        try:
            options = DecodingOptions.from_request(options, self.defaults).validate(self.token_limit)
        except DecodingError as error:
            raise ServingError(400, str(error)) from None
        self._check_size(len(payload))
        try:  # here, in the request's own parse: a failure is this request's alone
            pixels = self.captioner.load_pixels(bytes(payload), self.config.formats, self.config.max_image_pixels,
                                                self.config.max_image_bytes)
        except ImageError as error:
            raise ServingError(400, str(error)) from None
        return ImageRequest(pixels, options, (time.perf_counter() - start) * 1e3)

    def _form_image(self, row: dict) -> bytes:
        """The body of a form-urlencoded request when it is an image of an accepted format (its header is
        read, nothing decoded), else 415: an image sent with curl's default content type is captioned."""
        payload = row.get("body")
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

    def _from_form(self, row: dict, headers: dict) -> tuple[bytes, dict]:
        files = [name for name in row if _is_file_part(name, headers)]
        if len(files) != 1:
            raise ServingError(400, f"a multipart request needs exactly one file part holding the image besides the "
                                    f"option fields ({', '.join(REQUEST_OPTIONS)}); got {len(files)} file parts"
                                    + (f": {quote_names(files)}" if files else ""))
        payload = row[files[0]]
        if not isinstance(payload, (bytes, bytearray)):
            raise ServingError(400, f"multipart part {quote(files[0])} holds no image bytes")
        return payload, self._fields(row, files[0])

    def _fields(self, row: dict, payload: str) -> dict:
        """The row's text fields, every key but the `payload` one: multipart fields, and query-string parameters
        where TorchServe passes them (its /invocations and /{model}/predict routes; /predictions drops them)."""
        fields = {}
        for name, value in row.items():
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

    def caption_batch(self, requests: list[ImageRequest | ServingError]) -> tuple[list[Reply], BatchStats]:
        """Caption every good request; one batched decode per distinct set of options."""
        replies: list[Reply | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            if isinstance(request, ServingError):
                replies[index] = request.reply()
            else:
                groups.setdefault(_group_key(index, request.options), []).append(index)
        totals = {"preprocess": sum(r.preprocess_ms for r in requests if isinstance(r, ImageRequest)),
                  "encode": 0.0, "decode": 0.0}
        tokens = captioned = 0
        for indices in groups.values():
            for run, batch in self._caption_group(requests, indices):
                if batch is None:
                    replies[run[0]] = ServingError(500, "captioning failed: internal error (logged on the server)").reply()
                    continue
                totals["encode"] += batch.timings_ms["encode"]
                totals["decode"] += batch.timings_ms["decode"]
                for i, caption in zip(run, batch.captions):
                    timings = {"preprocess": requests[i].preprocess_ms, **batch.timings_ms}
                    replies[i] = Reply(200, {"caption": caption.caption, "token_ids": caption.token_ids,
                                             "timings_ms": {k: round(v, 3) for k, v in timings.items()}})
                    tokens += len(caption.token_ids)
                    captioned += 1
        return replies, BatchStats(len(requests), captioned, tokens, totals)

    def _caption_group(self, requests: list, indices: list[int]) -> list[tuple[list[int], "CaptionBatch | None"]]:
        """(request indices, captions) per decode run: one batched run for requests sharing options; if it
        raises, one run per request, so only the request that fails alone gets None (its 500)."""
        options = requests[indices[0]].options
        try:
            pixels = torch.stack([requests[i].pixels for i in indices])
            return [(indices, self.captioner.caption_pixels(pixels, options))]
        except Exception:  # never the worker, never a batch mate
            if len(indices) == 1:
                logger.exception("request %s: captioning failed", requests[indices[0]].request_id)
                return [(indices, None)]
            logger.exception("batched captioning of requests %s failed; captioning them one by one",
                             ", ".join(requests[i].request_id for i in indices))
        return [run for i in indices for run in self._caption_group(requests, [i])]


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
    """This process's torch compute threads, before a runtime is opened (onnxruntime's sessions take
    torch.get_num_threads()); logged, with `why`."""
    torch.set_num_threads(threads)
    logger.info("compute threads: %d (%s)", threads, why)


def request_label(request_id: str, headers: dict) -> str:
    """How log lines name a request: the server's id (TorchServe answers it as X-Request-ID), and the
    client's own X-Request-ID, quoted, when it sent one."""
    client = next((v for k, v in headers.items() if k.lower() == "x-request-id" and isinstance(v, str)), None)
    return request_id if client is None else f"{request_id} (X-Request-ID {quote(client, 64)})"


def _refuse_repeated_parts(headers: dict) -> None:
    """A part or field sent more than once: TorchServe keeps only the last in the row, the handler records
    every name under PART_NAMES (a list; any other value there did not come from the handler)."""
    names = headers.get(PART_NAMES)
    if isinstance(names, list):
        repeated = [name for name, count in Counter(names).items() if count > 1]
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


def _is_file_part(name: str, headers: dict) -> bool:
    """TorchServe puts each part's own content type in the headers under its name: a file part has one,
    a text field (or a query-string parameter) has ''. Without that entry, option names are fields."""
    part = headers.get(name)
    if isinstance(part, dict):
        return bool(part.get("content-type"))
    return name not in REQUEST_OPTIONS


def _content_type(headers: dict) -> str:
    """The request's media type, lower case, parameters dropped ('' when none was sent)."""
    value = next((v for k, v in headers.items() if k.lower() == "content-type" and isinstance(v, str)), "")
    return value.split(";")[0].strip().lower()


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


def _group_key(index: int, options: DecodingOptions) -> tuple:
    # A seeded nucleus request samples row i with seed + i; alone in its group it gets exactly its seed.
    own_group = options.strategy == "nucleus" and options.seed is not None
    return dataclasses.astuple(options), index if own_group else None
