"""Serving: everything the TorchServe handler does, written so it runs (and is tested) without TorchServe.

A TorchServe batch arrives as one row per HTTP request. Each row is checked and preprocessed on
its own (content type, body size, decoding options, image decoding, resize/normalise), so a bad
request gets its own 4xx answer (a bug, its own 500) and never fails the others; the good rows
are captioned together, one batched decode per distinct set of decoding options. If a batched
decode raises, its requests are captioned one by one, so only the failing one answers 500. The
handler's settings (`ServingConfig`) are clipcap.serving_config's; clipcap.export.mar packs a
bundle, the handler and `model-config.yaml` into a `.mar`.

Requests (TorchServe's own parsing already split multipart forms and decoded JSON):
- raw image bytes as the body (Content-Type image/*, application/octet-stream or none);
- multipart/form-data: one image part plus optional text fields named after `REQUEST_OPTIONS`;
- application/json: {"image": "<base64>", "decoding": "beam", "beam_size": 3, ...}.
URLs are never fetched: an image arrives in the request or not at all.
"""
from __future__ import annotations

import base64
import dataclasses
import http
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipcap.decoding import REQUEST_OPTIONS, DecodingError, DecodingOptions
from clipcap.images import ImageError, decode_image
from clipcap.serving_config import MODEL_CONFIG_FILE, ServingConfig, ServingConfigError

if TYPE_CHECKING:
    from clipcap.captioner import CaptionBatch, Captioner

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
RAW_TYPES = ("application/octet-stream", "")  # plus every image/*: the bytes, not the header, decide the format
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

    @classmethod
    def from_archive(cls, model_dir: str | Path, model_config: dict | None, gpu_id: int | None = None,
                     ) -> "CaptionService":
        """Open the bundle unpacked from a .mar, with the settings of its model-config.yaml."""
        from clipcap.captioner import Captioner

        config = ServingConfig.from_dict((model_config or {}).get("handler"))
        captioner = Captioner.from_path(Path(model_dir) / config.bundle, backend=config.backend,
                                        device=resolve_device(config.device, gpu_id))
        return cls(captioner, config)

    # -- requests -------------------------------------------------------------------------------

    def parse_batch(self, rows: list[dict], headers: list[dict]) -> list[ImageRequest | ServingError]:
        """TorchServe rows (one dict per request: part name -> value) and their request headers."""
        parsed: list[ImageRequest | ServingError] = []
        for row, row_headers in zip(rows, headers):
            try:
                parsed.append(self.parse(row, row_headers))
            except ServingError as error:
                parsed.append(error)
            except Exception:  # a bug must cost one request, never the batch or the worker
                logger.exception("unexpected error while reading a request")
                parsed.append(ServingError(500, "internal error while reading the request (logged on the server)"))
        return parsed

    def parse(self, row: dict, headers: dict) -> ImageRequest:
        """One request -> a checked image and decoding options, or ServingError."""
        start = time.perf_counter()
        if all(_is_empty(value) for value in row.values()):
            raise ServingError(400, f"empty request: {HOW_TO_SEND}")
        content_type = _content_type(headers)
        if content_type == MULTIPART_TYPE:
            payload, options = self._from_form(row)
        elif content_type == JSON_TYPE:
            payload, options = self._from_json(row.get("body"))
        elif content_type.startswith("image/") or content_type in RAW_TYPES:
            payload, options = row.get("body"), {}
            if not isinstance(payload, (bytes, bytearray)):
                raise ServingError(400, f"no request body: {HOW_TO_SEND}")
        else:
            raise ServingError(415, f"content type {content_type!r} is not accepted: {HOW_TO_SEND}")
        try:
            options = DecodingOptions.from_request(options, self.defaults).validate(self.token_limit)
        except DecodingError as error:
            raise ServingError(400, str(error)) from None
        self._check_size(len(payload))
        try:
            image = decode_image(bytes(payload), self.config.max_image_pixels)
        except ImageError as error:
            raise ServingError(400, str(error)) from None
        pixels = self.captioner.preprocess_one(image)  # here: its failure is this request's alone
        return ImageRequest(pixels, options, (time.perf_counter() - start) * 1e3)

    def _from_json(self, body: Any) -> tuple[bytes, dict]:
        if isinstance(body, (bytes, bytearray)):  # TorchServe hands the bytes on when it cannot parse them
            try:
                body = json.loads(body)
            except ValueError as error:
                raise ServingError(400, f"body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ServingError(400, 'a JSON body must be an object: {"image": "<base64>", "decoding": ..., ...}')
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise ServingError(400, 'a JSON body needs "image": a non-empty base64 string of the image bytes')
        self._check_size(len(image) * 3 // 4)  # refuse before decoding
        try:
            payload = base64.b64decode(image, validate=True)
        except ValueError as error:  # binascii.Error, or text that is not ASCII
            raise ServingError(400, f'"image" is not valid base64 ({error})') from None
        return payload, {key: value for key, value in body.items() if key != "image"}

    def _from_form(self, row: dict) -> tuple[bytes, dict]:
        parts = [name for name in row if name not in REQUEST_OPTIONS]
        if len(parts) != 1:
            raise ServingError(400, f"a multipart request needs exactly one image part besides the option fields "
                                    f"({', '.join(REQUEST_OPTIONS)}); got {', '.join(parts) or 'none'}")
        payload = row[parts[0]]
        if not isinstance(payload, (bytes, bytearray)):
            raise ServingError(400, f"multipart part {parts[0]!r} holds no image bytes")
        return payload, {name: _form_value(name, row[name]) for name in row if name in REQUEST_OPTIONS}

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
                logger.exception("captioning failed for request %d of the batch", indices[0])
                return [(indices, None)]
            logger.exception("batched captioning of %d requests failed; captioning them one by one", len(indices))
        return [run for i in indices for run in self._caption_group(requests, [i])]


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
            raise ServingError(400, f"form field {name!r} is not UTF-8 text") from None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _group_key(index: int, options: DecodingOptions) -> tuple:
    # A seeded nucleus request samples row i with seed + i; alone in its group it gets exactly its seed.
    own_group = options.strategy == "nucleus" and options.seed is not None
    return dataclasses.astuple(options), index if own_group else None
