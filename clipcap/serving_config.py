"""The `handler:` section of TorchServe's model-config.yaml: what clipcap.serving runs with and what
clipcap.export.mar checks before it packs an archive.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from clipcap.config import BundleError, dataclass_from_dict
from clipcap.decoding import REQUEST_OPTIONS
from clipcap.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, check_formats
from clipcap.quoting import quote, quote_names

MODEL_CONFIG_FILE = "model-config.yaml"


class ServingConfigError(ValueError):
    """The `handler:` section of model-config.yaml is invalid; the message names the key."""


@dataclass
class ServingConfig:
    """The `handler:` section of model-config.yaml. Every key is optional."""

    bundle: str = "bundle"  # the model or export bundle's folder inside the archive (build_archive puts it there)
    backend: str | None = None  # None: the one the bundle's kind needs; or torch, onnxruntime, tensorrt
    device: str = "auto"  # auto: the GPU TorchServe gave this worker, else cpu; or cpu, cuda, cuda:N
    defaults: dict = field(default_factory=dict)  # decoding when a request sets none, in request keys
    max_tokens: int | None = None  # the most tokens a request may ask for; None: the bundle's max_tokens
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # width x height, read from the header before decoding
    max_body_bytes: int = 8 * 1024 * 1024  # image bytes (after base64); TorchServe's max_request_size caps HTTP
    max_options_bytes: int = 4096  # a request's options (JSON keys besides "image", form fields) in all
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))  # image formats read (clipcap.images)
    decode_threads: int = 2  # a batch's images decoded at once (Pillow releases the GIL); memory: that many images
    batch_rows: int = 16  # rows the engine decodes together at most (a beam request takes beam_size of them)
    encode_batch: int = 8  # images the engine encodes together at most
    encode_wait_ms: float = 5.0  # an idle engine waits this long for more images to encode with the first
    max_queued: int = 64  # requests waiting to start; one more is answered 503 with Retry-After
    deadline_s: float | None = 60.0  # a request not finished this long after it arrived: 504, its rows freed

    @classmethod
    def from_dict(cls, data: Any) -> "ServingConfig":
        try:
            config = dataclass_from_dict(cls, data if data is not None else {}, MODEL_CONFIG_FILE, prefix="handler.")
        except BundleError as error:
            raise ServingConfigError(str(error)) from None
        return config.validate()

    def validate(self) -> "ServingConfig":
        from clipcap.runtimes import RUNTIMES

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ServingConfigError(f"{MODEL_CONFIG_FILE}: handler.{key} {message}")

        check(self.backend is None or self.backend in RUNTIMES, "backend",
              f"{quote(self.backend)} is not a backend; known: {', '.join(RUNTIMES)}")
        check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
              f"must be auto, cpu, cuda or cuda:N, got {quote(self.device)}")
        unknown = sorted(set(self.defaults) - set(REQUEST_OPTIONS))
        check(not unknown, "defaults", f"has unknown key(s) {quote_names(unknown)}; known: {', '.join(REQUEST_OPTIONS)}")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        check(self.max_body_bytes >= 1, "max_body_bytes", "must be >= 1")
        check(self.max_options_bytes >= 1, "max_options_bytes", "must be >= 1")
        check(self.decode_threads >= 1, "decode_threads", "must be >= 1")
        check(self.batch_rows >= 1, "batch_rows", "must be >= 1")
        check(self.encode_batch >= 1, "encode_batch", "must be >= 1")
        check(self.encode_wait_ms >= 0, "encode_wait_ms", "must be >= 0")
        check(self.max_queued >= 1, "max_queued", "must be >= 1")
        check(self.deadline_s is None or self.deadline_s > 0, "deadline_s", "must be > 0 (or null: no deadline)")
        check(isinstance(self.formats, list) and all(isinstance(f, str) for f in self.formats), "formats",
              "must be a list of format names")
        try:
            self.formats = list(check_formats(self.formats))
        except ValueError as error:
            raise ServingConfigError(f"{MODEL_CONFIG_FILE}: handler.formats: {error}") from None
        return self
