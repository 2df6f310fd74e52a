"""model-config.yaml: its `handler:` section (what clipcap.serving runs with) and TorchServe's own keys,
all checked by clipcap.export.mar before it packs an archive; and the compute threads a worker gets.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from clipcap.config import BundleError, dataclass_from_dict
from clipcap.decoding import REQUEST_OPTIONS
from clipcap.images import DEFAULT_FORMATS, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, check_formats
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
    max_image_bytes: int = DEFAULT_MAX_BYTES  # decoded bytes (clipcap.images.decoded_bytes), known before decoding
    max_body_bytes: int = 8 * 1024 * 1024  # image bytes (after base64); TorchServe's max_request_size caps HTTP
    max_options_bytes: int = 4096  # a request's options (JSON keys besides "image", form fields) in all
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))  # image formats read (clipcap.images)
    decode_threads: int = 2  # a batch's images decoded at once (Pillow releases the GIL); memory: that many images
    threads: int | None = None  # torch and onnxruntime compute threads a worker; None: `worker_threads`' default

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
        check(self.max_image_bytes >= 1, "max_image_bytes", "must be >= 1")
        check(self.max_body_bytes >= 1, "max_body_bytes", "must be >= 1")
        check(self.max_options_bytes >= 1, "max_options_bytes", "must be >= 1")
        check(self.decode_threads >= 1, "decode_threads", "must be >= 1")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        check(isinstance(self.formats, list) and all(isinstance(f, str) for f in self.formats), "formats",
              "must be a list of format names")
        try:
            self.formats = list(check_formats(self.formats))
        except ValueError as error:
            raise ServingConfigError(f"{MODEL_CONFIG_FILE}: handler.formats: {error}") from None
        return self


def _integer(low: int) -> tuple:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


_BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"
# TorchServe 0.12's own model-config.yaml keys (its frontend's ModelConfig) and the values it takes. Its
# frontend logs a value of the wrong type and runs the default instead, and raises a too small count to 1:
# refused here, when the archive is packed.
TORCHSERVE_KEYS = {
    "minWorkers": _integer(1), "maxWorkers": _integer(1), "batchSize": _integer(1), "maxBatchDelay": _integer(0),
    "responseTimeout": _integer(1), "startupTimeout": _integer(1),
    "deviceType": ((lambda v: v in ("cpu", "gpu")), "cpu or gpu"),
    "parallelType": ((lambda v: v in ("pp", "tp", "pptp", "custom")), "pp, tp, pptp or custom"),
    "parallelLevel": _integer(0),
    "deviceIds": ((lambda v: isinstance(v, list) and all(_integer(0)[0](i) for i in v)), "a list of GPU ids"),
    "torchrun": ((lambda v: isinstance(v, dict)), "a mapping of torchrun settings"),
    "maxRetryTimeoutInSec": _integer(0), "clientTimeoutInMills": _integer(0), "jobQueueSize": _integer(1),
    "useJobTicket": _BOOLEAN, "sequenceMaxIdleMSec": _integer(1), "sequenceTimeoutMSec": _integer(1),
    "maxSequenceJobQueueSize": _integer(1), "maxNumSequence": _integer(1), "continuousBatching": _BOOLEAN,
    "sequenceBatching": _BOOLEAN, "asyncCommunication": _BOOLEAN, "useVenv": _BOOLEAN,
}


def read_model_config(path: str | Path) -> dict:
    """A model-config.yaml's settings; ServingConfigError in one line (file:line:column) when it is not a
    YAML mapping."""
    import yaml

    try:
        settings = yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ServingConfigError(f"{where}: YAML syntax error: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ServingConfigError(f"{path}: YAML syntax error: {str(error).splitlines()[0]}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ServingConfigError(f"{path}: must be a YAML mapping of TorchServe settings")
    return settings


def check_model_config(settings: dict, where: str = MODEL_CONFIG_FILE) -> ServingConfig:
    """model-config.yaml's settings: every key one of TORCHSERVE_KEYS with a value it takes, or `handler:`
    (returned as a checked ServingConfig); ServingConfigError naming the key. An unknown key is refused: a
    misspelt one (`batchsize`) would silently leave TorchServe's default in place."""
    for key, value in settings.items():
        if key == "handler":
            continue
        if key not in TORCHSERVE_KEYS:
            raise ServingConfigError(f"{where}: unknown key {quote(key)}; TorchServe's keys: "
                                     f"{', '.join(TORCHSERVE_KEYS)}, and handler: for clipcap")
        accepts, expected = TORCHSERVE_KEYS[key]
        if not accepts(value):
            raise ServingConfigError(f"{where}: {key} must be {expected}, got {quote(value)}")
    workers = settings.get("minWorkers", 1), settings.get("maxWorkers", settings.get("minWorkers", 1))
    if workers[0] > workers[1]:
        raise ServingConfigError(f"{where}: minWorkers ({workers[0]}) must be <= maxWorkers ({workers[1]})")
    return ServingConfig.from_dict(settings.get("handler"))


def worker_threads(threads: int | None, workers: int, cores: int | None = None,
                   environ: Mapping[str, str] = os.environ) -> int:
    """Compute threads for each of `workers` processes: `threads` when set; else OMP_NUM_THREADS when the
    environment sets it (KServe's manifests match it to the pod's CPU request, which the affinity mask
    does not show; the benchmarks set it); else the `cores` (None: the CPUs this process may run on) left
    after one, kept for TorchServe's frontend and image decoding, shared among the workers, at least 1."""
    if threads is not None:
        return threads
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) >= 1:
        return int(environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, (cores - 1) // max(1, workers))
