"""Serving without TorchServe: request parsing and limits, batched captioning, the handler, clipcap.mar."""
import asyncio
import base64
import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import pillow_heif.HeifImagePlugin  # noqa: F401  (registers the HEIF writer the tests save with)
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipcap.runtimes.base as runtimes_base
from clipcap.arrays import to_numpy
from clipcap.captioner import Captioner
from clipcap.runtimes import compute_threads
from clipcap.serving.engine import CaptionRequest
from clipcap.serving.form import PART_NAMES, from_torchserve
from clipcap.serving.service import CaptionService, ServingConfig, ServingConfigError, ServingError, batch_size_bucket
from clipcap.serving.config import check_model_config, read_model_config, worker_threads
from conftest import png_bytes, random_images


def parse_rows(service, rows, headers, ids=None):
    """TorchServe's rows and request headers, read as the handler reads them."""
    return service.parse_batch([from_torchserve(row, h) for row, h in zip(rows, headers, strict=True)], ids)


def parse_row(service, row, headers):
    return service.parse(from_torchserve(row, headers))

SERVING = Path(__file__).resolve().parent.parent / "serving"
IMAGES = random_images(4)
PNGS = [png_bytes(image) for image in IMAGES]
RAW = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "multipart/form-data; boundary=x"}


@pytest.fixture(scope="module")
def captioner(tiny_bundle):
    return Captioner.from_path(tiny_bundle)


@pytest.fixture(scope="module")
def service(captioner):
    return CaptionService(captioner, ServingConfig())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _truncated_png() -> bytes:
    return PNGS[0][: len(PNGS[0]) // 2]


# -- configuration --------------------------------------------------------------------------------

def test_config_defaults_and_shipped_yaml():
    assert ServingConfig.from_dict(None) == ServingConfig()
    shipped = yaml.safe_load((SERVING / "model-config.yaml").read_text())
    config = ServingConfig.from_dict(shipped["handler"])
    assert (config.backend, config.device, config.defaults) == (None, "auto", {"decoding": "greedy"})


@pytest.mark.parametrize("section, fragment", [
    ({"colour": "red"}, "unknown field(s) handler.colour"),
    ({"max_tokens": "many"}, "handler.max_tokens' must be int"),
    ({"max_tokens": 0}, "handler.max_tokens must be >= 1"),
    ({"backend": "nope"}, "handler.backend 'nope' is not a backend"),
    ({"device": "gpu"}, "handler.device must be auto, cpu, cuda or cuda:N"),
    ({"defaults": {"beam": 3}}, "handler.defaults has unknown key(s) 'beam'"),
    ({"max_body_bytes": -1}, "handler.max_body_bytes must be >= 1"),
    ({"formats": ["JPEG", "PSD"]}, "handler.formats: unknown image format(s) PSD"),
    ({"formats": []}, "handler.formats: at least one image format"),
    ({"formats": "JPEG"}, "handler.formats' must be list"),
    ({"decode_threads": 0}, "handler.decode_threads must be >= 1"),
    ({"threads": 0}, "handler.threads must be >= 1 or null"),
    ({"threads": "auto"}, "handler.threads' must be int"),
    ({"max_image_bytes": 0}, "handler.max_image_bytes must be >= 1"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_config_names_the_key(section, fragment):
    with pytest.raises(ServingConfigError, match="model-config.yaml") as error:
        ServingConfig.from_dict(section)
    assert fragment in str(error.value)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 512), st.integers(1, 64), st.none() | st.integers(1, 64))
def test_worker_threads_leave_a_core_and_share_the_rest(cores, workers, configured):
    threads = worker_threads(configured, workers, cores, environ={})
    if configured is not None:
        assert threads == configured
        assert worker_threads(configured, workers, cores, environ={"OMP_NUM_THREADS": "5"}) == configured
    else:
        assert threads >= 1 and (threads * workers <= cores - 1 or threads == 1)
        assert (threads + 1) * workers > cores - 1  # no core left idle that a thread each could use
        assert worker_threads(None, workers, cores, environ={"OMP_NUM_THREADS": "5"}) == 5  # an explicit setting
        for unset in ("", "0", "two"):
            assert worker_threads(None, workers, cores, environ={"OMP_NUM_THREADS": unset}) == threads
    assert [worker_threads(None, w, c, environ={}) for w, c in ((1, 2), (1, 16), (4, 16))] == [1, 15, 3]


@pytest.mark.parametrize("model_config, expected", [
    ({"maxWorkers": 1, "handler": {"threads": 3}}, 3),
    ({"maxWorkers": 2}, max(1, (len(os.sched_getaffinity(0)) - 1) // 2)),
    (None, 1),  # no maxWorkers: TorchServe starts a worker per core
])
def test_a_service_from_an_archive_sets_the_compute_threads_before_opening_the_runtime(
        tiny_bundle, tmp_path, monkeypatch, caplog, model_config, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtimes_base, "_compute_threads", [None])  # this process's setting, restored after
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    opened_with = []
    monkeypatch.setattr(Captioner, "from_path", classmethod(lambda cls, *a, **k: opened_with.append(
        torch.get_num_threads()) or Captioner.__new__(cls)))
    monkeypatch.setattr(CaptionService, "__init__", lambda self, captioner, config: None)
    monkeypatch.setattr(CaptionService, "warm_up", lambda self, max_batch_size: [])  # no captioner to warm
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(7)
        with caplog.at_level(logging.INFO, logger="clipcap.serving"):
            CaptionService.from_archive(tmp_path, model_config)
        assert opened_with == [expected] and torch.get_num_threads() == expected == compute_threads()
        assert f"compute threads: {expected} (" in caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("settings, fragment", [
    ({"batchSize": "eight"}, "batchSize must be an integer >= 1, got 'eight'"),
    ({"batchSize": 0}, "batchSize must be an integer >= 1, got 0"),
    ({"batchSize": True}, "batchSize must be an integer >= 1, got True"),
    ({"minWorkers": 3, "maxWorkers": 2}, "minWorkers (3) must be <= maxWorkers (2)"),
    ({"minWorkers": 2}, "minWorkers (2) must be <= maxWorkers (1)"),
    ({"responseTimeout": -5}, "responseTimeout must be an integer >= 1, got -5"),
    ({"maxBatchDelay": 2.5}, "maxBatchDelay must be an integer >= 0, got 2.5"),
    ({"deviceType": "tpu"}, "deviceType must be cpu or gpu, got 'tpu'"),
    ({"parallelType": "dp"}, "parallelType must be pp, tp, pptp or custom"),
    ({"deviceIds": [0, "1"]}, "deviceIds must be a list of GPU ids"),
    ({"jobQueueSize": 0}, "jobQueueSize must be an integer >= 1"),
    ({"asyncCommunication": "yes"}, "asyncCommunication must be true or false"),
    ({"batchsize": 8}, "unknown key 'batchsize'; TorchServe's keys: minWorkers, maxWorkers, batchSize"),
    ({"handler": {"threads": -1}}, "handler.threads must be >= 1 or null"),
])
def test_model_config_refuses_what_torchserve_would_not_run_as_written(settings, fragment):
    shipped = yaml.safe_load((SERVING / "model-config.yaml").read_text())
    assert check_model_config(shipped) == ServingConfig.from_dict(shipped["handler"])
    with pytest.raises(ServingConfigError) as error:
        check_model_config({**shipped, **settings})
    assert fragment in str(error.value)


def test_a_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "model-config.yaml"
    path.write_text("batchSize: 8\nhandler:\n  backend: [torch\n  device: cpu\n")
    with pytest.raises(ServingConfigError) as error:
        read_model_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:4:") and "YAML syntax error" in message and "\n" not in message
    path.write_text("- a list\n")
    with pytest.raises(ServingConfigError, match="must be a YAML mapping"):
        read_model_config(path)


def test_out_of_range_defaults_refused_at_load(captioner):
    with pytest.raises(ServingConfigError, match="handler.defaults: beam_size must be an integer in 1..16"):
        CaptionService(captioner, ServingConfig(defaults={"decoding": "beam", "beam_size": 100}))


def test_max_tokens_caps_requests_and_defaults(captioner):
    service = CaptionService(captioner, ServingConfig(max_tokens=5))
    assert service.defaults.max_tokens == 5  # the bundle's 24 would exceed the cap
    with pytest.raises(ServingError, match=r"max_tokens must be an integer in 1\.\.5"):
        parse_row(service, {"body": {"image": _b64(PNGS[0]), "max_tokens": 6}}, JSON)
    replies, _ = service.caption_batch(parse_rows(service, [{"body": bytearray(PNGS[0])}], [RAW]))
    assert 1 <= len(replies[0].body["token_ids"]) <= 5


# -- parsing: every accepted form ----------------------------------------------------------------

@pytest.mark.parametrize("row, headers", [
    ({"body": bytearray(PNGS[1])}, RAW),
    ({"body": bytearray(PNGS[1])}, {}),  # curl -T sends no content type
    ({"body": bytearray(PNGS[1])}, {"content-type": "application/octet-stream"}),
    ({"body": {"image": _b64(PNGS[1])}}, JSON),  # TorchServe already decoded the JSON
    ({"body": bytearray(json.dumps({"image": _b64(PNGS[1])}).encode())}, JSON),  # ... or could not
    ({"data": bytearray(PNGS[1])}, FORM),
])
def test_accepted_forms_give_the_same_image(service, captioner, row, headers):
    request = parse_row(service, row, headers)
    assert isinstance(request, CaptionRequest)
    assert np.array_equal(request.pixels, captioner.preprocess([IMAGES[1]])[0])
    assert request.options == service.defaults


def test_options_from_json_and_form_fields(service):
    from_json = parse_row(service, {"body": {"image": _b64(PNGS[0]), "decoding": "beam", "beam_size": 3}}, JSON)
    form = {"file": bytearray(PNGS[0]), "decoding": bytearray(b"beam"), "beam_size": bytearray(b"3")}
    from_form = parse_row(service, form, FORM)
    assert from_json.options == from_form.options == service.defaults.replace(strategy="beam", beam_size=3)


def test_jpeg_and_webp_accepted(service):
    for fmt, content_type in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        request = parse_row(service, {"body": bytearray(png_bytes(IMAGES[0], fmt))}, {"Content-Type": content_type})
        assert request.pixels.shape == (3, 32, 32)


# -- parsing: every refusal ----------------------------------------------------------------------

BAD_REQUESTS = [
    ("empty body", {"body": bytearray()}, RAW, 400, "empty request"),
    ("no parts", {}, {}, 400, "empty request"),
    ("not an image", {"body": bytearray(b"hello, world")}, RAW, 400, "not a recognised image"),
    ("truncated image", {"body": bytearray(_truncated_png())}, RAW, 400, "corrupt or truncated image"),
    ("eps", {"body": bytearray(png_bytes(IMAGES[0], "EPS"))}, {"Content-Type": "image/eps"}, 400,
     "format EPS not accepted"),
    ("bad base64", {"body": {"image": "not*base64!"}}, JSON, 400, "not valid base64"),
    ("bad JSON", {"body": bytearray(b'{"image": ')}, JSON, 400, "not valid JSON"),
    ("JSON list", {"body": [1, 2]}, JSON, 400, "must be an object"),
    ("JSON without image", {"body": {"decoding": "beam"}}, JSON, 400, 'needs "image"'),
    ("JSON image not a string", {"body": {"image": 5}}, JSON, 400, 'needs "image"'),
    ("beam size out of range", {"body": {"image": _b64(PNGS[0]), "decoding": "beam", "beam_size": 100}}, JSON,
     400, "beam_size must be an integer in 1..16"),
    ("max_tokens out of range", {"body": {"image": _b64(PNGS[0]), "max_tokens": 10_000}}, JSON, 400,
     "max_tokens must be an integer in 1..24"),
    ("top_p wrong type", {"body": {"image": _b64(PNGS[0]), "decoding": "nucleus", "top_p": "high"}}, JSON, 400,
     "top_p must be a number in"),
    ("option the strategy ignores", {"body": {"image": _b64(PNGS[0]), "beam_size": 3}}, JSON, 400,
     "beam_size is used only by decoding beam, not by decoding greedy"),
    ("unknown strategy", {"body": {"image": _b64(PNGS[0]), "decoding": "best"}}, JSON, 400, "decoding must be"),
    ("unknown option", {"body": {"image": _b64(PNGS[0]), "url": "http://example.com/a.png"}}, JSON, 400,
     "unknown option(s) 'url'"),
    ("text body", {"body": "hello"}, {"Content-Type": "text/plain"}, 415, "content type 'text/plain'"),
    ("url-encoded form", {"image": "x"}, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "not accepted"),
    ("two image parts", {"a": bytearray(PNGS[0]), "b": bytearray(PNGS[1])}, FORM, 400, "exactly one file part"),
    ("form option not text", {"data": bytearray(PNGS[0]), "beam_size": bytearray(b"\xff\xfe")}, FORM, 400,
     "field 'beam_size' is not UTF-8"),
]


@pytest.mark.parametrize("name, row, headers, status, fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_refused_with_clear_message(service, name, row, headers, status, fragment):
    with pytest.raises(ServingError) as error:
        parse_row(service, row, headers)
    assert error.value.status == status
    assert fragment in error.value.message
    reply = error.value.reply()
    assert reply.status == status and reply.body["code"] == status and fragment in reply.body["message"]


def test_size_and_pixel_limits(captioner):
    small = CaptionService(captioner, ServingConfig(max_body_bytes=len(PNGS[0]) - 1, max_image_pixels=47 * 47))
    for row, headers in (({"body": bytearray(PNGS[0])}, RAW), ({"body": {"image": _b64(PNGS[0])}}, JSON),
                         ({"data": bytearray(PNGS[0])}, FORM)):
        with pytest.raises(ServingError, match="over the limit of") as error:
            parse_row(small, row, headers)
        assert error.value.status == 413
    roomy = CaptionService(captioner, ServingConfig(max_image_pixels=47 * 47))
    with pytest.raises(ServingError, match="48x48 = 2304 pixels, over the limit of 2209 pixels") as error:
        parse_row(roomy, {"body": bytearray(PNGS[0])}, RAW)
    assert error.value.status == 400


def test_an_image_at_the_body_limit_is_accepted_in_every_form(captioner):
    """max_body_bytes counts image bytes: as base64 in JSON they grow by 4/3 and still fit, with a full
    max_options_bytes of options beside them; one byte more is a 413."""
    limit = len(PNGS[0])
    service = CaptionService(captioner, ServingConfig(max_body_bytes=limit, max_options_bytes=128))
    options = {"decoding": "beam", "beam_size": 2, "max_tokens": 5, "temperature": 1.0}
    body = json.dumps({"image": _b64(PNGS[0]), **options}, separators=(", ", ": ")).encode()
    assert len(body) > 4 * limit // 3 + 40  # the raw JSON is well over the image limit...
    assert parse_row(service, {"body": bytearray(body)}, JSON).options.beam_size == 2  # ...and accepted
    for row, headers in (({"body": bytearray(PNGS[0])}, RAW), ({"data": bytearray(PNGS[0])}, FORM)):
        parse_row(service, row, headers)
    tight = CaptionService(captioner, ServingConfig(max_body_bytes=limit - 1, max_options_bytes=128))
    with pytest.raises(ServingError, match="over the limit") as error:
        parse_row(tight, {"body": bytearray(body)}, JSON)
    assert error.value.status == 413


# -- batched captioning ---------------------------------------------------------------------------

def test_batch_captions_match_library_and_bad_rows_fail_alone(service, captioner):
    rows = [{"body": bytearray(PNGS[0])}, {"body": bytearray(b"junk")},
            {"body": {"image": _b64(PNGS[2]), "decoding": "beam", "beam_size": 3}},
            {"body": bytearray(PNGS[3])}, {"body": bytearray(b'{"image"')}]
    headers = [RAW, RAW, JSON, RAW, JSON]
    replies, stats = service.caption_batch(parse_rows(service, rows, headers))
    assert [r.status for r in replies] == [200, 400, 200, 200, 400]
    greedy = captioner.caption_images([IMAGES[0], IMAGES[3]], service.defaults).captions  # one batched decode
    beam = captioner.caption_images([IMAGES[2]], service.defaults.replace(strategy="beam", beam_size=3)).captions
    for reply, expected in zip([replies[0], replies[3], replies[2]], greedy + beam):
        assert reply.body["caption"] == expected.caption
        assert reply.body["token_ids"] == expected.token_ids
        assert set(reply.body["timings_ms"]) == {"preprocess", "queue", "encode", "decode", "first_token"}
    assert "not a recognised image" in replies[1].body["message"]
    assert (stats.batch_size, stats.captioned) == (5, 3)
    assert stats.tokens == sum(len(c.token_ids) for c in greedy + beam)
    assert all(stats.timings_ms[stage] > 0 for stage in ("preprocess", "encode", "decode"))


def test_a_failing_decode_answers_500_others_succeed(service, captioner, monkeypatch):
    """The decode (not the encoder) fails for one request's prefix: only that request answers 500."""
    real = captioner.runtime.step
    poison = captioner.runtime.encode(captioner.preprocess([IMAGES[1]]))[0]

    def step(embeds, cache):
        if embeds.shape[1] > 1 and any(np.allclose(to_numpy(row), to_numpy(poison), atol=1e-4) for row in embeds):
            raise RuntimeError("simulated backend failure")
        return real(embeds, cache)

    monkeypatch.setattr(captioner.runtime, "step", step)
    rows = [{"body": bytearray(PNGS[0])}, {"body": {"image": _b64(PNGS[1]), "decoding": "beam"}}]
    replies, stats = service.caption_batch(parse_rows(service, rows, [RAW, JSON]))
    assert [r.status for r in replies] == [200, 500]
    assert "internal error" in replies[1].body["message"] and stats.captioned == 1


def _strip_png(width: int = 1_000_000, height: int = 6) -> bytes:
    """The reported extreme strip (1,000,000x6 here): resized whole it needed a 5,333,333x32 intermediate."""
    return png_bytes(Image.new("RGB", (width, height), (200, 40, 40)))


def _poisoned_runtime(monkeypatch, captioner, poison) -> None:
    """Fault injection: the runtime raises for any batch holding the poison row (as a bad kernel might)."""
    real = captioner.runtime.encode

    def encode(pixels):
        if any(np.array_equal(to_numpy(row), to_numpy(poison)) for row in pixels):
            raise RuntimeError("simulated failure for one row")
        return real(pixels)

    monkeypatch.setattr(captioner.runtime, "encode", encode)


def test_a_failing_row_costs_only_its_own_request(service, captioner, monkeypatch):
    _poisoned_runtime(monkeypatch, captioner, captioner.preprocess([IMAGES[2]])[0])
    rows = [{"body": bytearray(png)} for png in PNGS]
    replies, stats = service.caption_batch(parse_rows(service, rows, [RAW] * 4))
    assert [r.status for r in replies] == [200, 200, 500, 200]
    for i in (0, 1, 3):
        assert replies[i].body["token_ids"] == captioner.caption_images([IMAGES[i]]).captions[0].token_ids
    assert "internal error" in replies[2].body["message"] and stats.captioned == 3


def test_preprocessing_runs_per_request_and_a_failure_there_is_its_own(service, captioner, monkeypatch):
    real = captioner.load_pixels
    poison = png_bytes(Image.new("RGB", (7, 5)))

    def load_pixels(data, *args):
        if data == poison:
            raise MemoryError("simulated")
        return real(data, *args)

    monkeypatch.setattr(captioner, "load_pixels", load_pixels)
    rows = [{"body": bytearray(PNGS[0])}, {"body": bytearray(poison)},
            {"body": bytearray(PNGS[1])}]
    replies, _ = service.caption_batch(parse_rows(service, rows, [RAW] * 3))
    assert [r.status for r in replies] == [200, 500, 200]
    expected = captioner.caption_images([IMAGES[0], IMAGES[1]], service.defaults).captions
    assert [replies[0].body["token_ids"], replies[2].body["token_ids"]] == [c.token_ids for c in expected]


def _photo_rows() -> list[dict]:
    """One image of each accepted format, and a few that fail, as raw request rows."""
    rows = []
    for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF"]):
        buffer = io.BytesIO()
        random_images(1, seed=i, size=40)[0].save(buffer, format=fmt)
        rows.append({"body": bytearray(buffer.getvalue())})
    return rows + [{"body": bytearray(b"not an image")}, {"body": bytearray(PNGS[0][:300])},
                   {"body": bytearray(png_bytes(IMAGES[0], "EPS"))}]


@pytest.mark.parametrize("threads", [2, 5])
def test_a_batch_decodes_on_threads_like_one_by_one(captioner, monkeypatch, threads):
    """handler.decode_threads: the same pixels and 4xx answers as decoding in series, each request on its
    own, never more images decoding at once than the setting (the memory bound)."""
    serial = parse_rows(CaptionService(captioner, ServingConfig(decode_threads=1)), _photo_rows(), [RAW] * 11)
    active, most, lock, real = [0], [0], threading.Lock(), captioner.load_pixels

    def counted(*args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(captioner, "load_pixels", counted)
    threaded = parse_rows(CaptionService(captioner, ServingConfig(decode_threads=threads)), _photo_rows(), [RAW] * 11)
    assert most[0] <= threads
    assert [getattr(r, "status", 200) for r in threaded] == [200] * 8 + [400] * 3
    for one, other in zip(serial, threaded):
        if isinstance(one, CaptionRequest):
            assert np.array_equal(one.pixels, other.pixels)
        else:
            assert (one.status, one.message) == (other.status, other.message)


def test_the_formats_setting_refuses_the_others(captioner):
    narrow = CaptionService(captioner, ServingConfig.from_dict({"formats": ["jpeg"]}))
    reply = parse_rows(narrow, [{"body": bytearray(PNGS[0])}], [RAW])[0]
    assert reply.status == 400 and "format PNG not accepted (accepted: JPEG)" in reply.message
    assert narrow.config.formats == ["JPEG"]


def test_one_poison_in_a_batch_of_seven(service, captioner):
    """Each poison kind inside seven valid requests: the poison gets its own 4xx, the seven their captions."""
    valid = [{"body": bytearray(PNGS[i % 4])} for i in range(7)]
    poisons = [({"body": bytearray(PNGS[0][:300])}, RAW, 400), ({"body": bytearray(b"\x89PNG junk")}, RAW, 400),
               ({"body": {"image": _b64(PNGS[0]), "beam_size": -1}}, JSON, 400),
               ({"body": "text"}, {"Content-Type": "text/plain"}, 415)]
    expected = [c.token_ids for c in captioner.caption_images([IMAGES[i % 4] for i in range(7)]).captions]
    for poison, poison_headers, status in poisons:
        rows, headers = valid[:3] + [poison] + valid[3:], [RAW] * 3 + [poison_headers] + [RAW] * 4
        replies, stats = service.caption_batch(parse_rows(service, rows, headers))
        assert replies[3].status == status and stats.captioned == 7
        assert [r.body["token_ids"] for r in replies[:3] + replies[4:]] == expected


def test_extreme_strip_is_captioned_from_its_centre(service, captioner):
    """The documented rule for extreme aspect ratios: a 200 with the caption of the centre square."""
    replies, _ = service.caption_batch(parse_rows(service, [{"body": bytearray(_strip_png())}], [RAW]))
    centre = Image.new("RGB", (6, 6), (200, 40, 40))
    assert replies[0].status == 200
    assert replies[0].body["token_ids"] == captioner.caption_images([centre], service.defaults).captions[0].token_ids


def test_unexpected_parse_error_costs_one_request(service, monkeypatch):
    real = service.parse

    def parse(form):
        if form.part("body").value == b"boom":
            raise RuntimeError("simulated bug")
        return real(form)

    monkeypatch.setattr(service, "parse", parse)
    parsed = parse_rows(service, [{"body": bytearray(b"boom")}, {"body": bytearray(PNGS[0])}], [RAW, RAW])
    assert isinstance(parsed[0], ServingError) and parsed[0].status == 500
    assert isinstance(parsed[1], CaptionRequest)


def test_seeded_nucleus_does_not_depend_on_the_batch(service, captioner):
    body = {"image": _b64(PNGS[1]), "decoding": "nucleus", "seed": 7, "top_p": 0.8, "temperature": 2.0}
    replies, _ = service.caption_batch(parse_rows(service, [{"body": dict(body)}] * 3, [JSON] * 3))
    options = service.defaults.replace(strategy="nucleus", seed=7, top_p=0.8, temperature=2.0)
    alone = captioner.caption_images([IMAGES[1]], options).captions[0]
    assert [r.body["token_ids"] for r in replies] == [alone.token_ids] * 3


def test_onnxruntime_export_bundle_serves_the_same_greedy_tokens(tiny_export, tmp_path, service):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    shutil.copytree(tiny_export, tmp_path / "bundle")  # as build_archive lays out an export bundle
    onnx = CaptionService.from_archive(tmp_path, {"handler": {"backend": "onnxruntime", "device": "cpu"}})
    rows, headers = [{"body": bytearray(png)} for png in PNGS], [RAW] * len(PNGS)
    expected, _ = service.caption_batch(parse_rows(service, rows, headers))
    replies, _ = onnx.caption_batch(parse_rows(onnx, rows, headers))
    assert [r.body["token_ids"] for r in replies] == [r.body["token_ids"] for r in expected]


# -- the TorchServe handler, driven with TorchServe's own Context but no server ---------------------

@pytest.fixture(scope="module")
def handler_setup(tiny_bundle, tmp_path_factory):
    pytest.importorskip("ts", reason="torchserve is not installed (pip install -e '.[serve]')")
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    model_dir = tmp_path_factory.mktemp("mar")
    shutil.copytree(tiny_bundle, model_dir / "bundle")  # the layout build_archive gives the unpacked archive
    spec = importlib.util.spec_from_file_location("clipcap_handler", SERVING / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = MetricsCacheYamlImpl(str(SERVING / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "clipcap"
    model_config = yaml.safe_load((SERVING / "model-config.yaml").read_text())
    context = Context("clipcap", str(model_dir), {"model": {"modelName": "clipcap"}}, 8, None, "0.12.0",
                      metrics=metrics, model_yaml_config=model_config)
    handler = module.ClipCapHandler()
    handler.initialize(context)
    return handler, context, module


def _run_batch(handler, context, rows, headers):
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"request-{i}" for i in range(len(rows))}
    context.metrics.set_request_ids(context.request_ids)
    answer = handler.handle(rows, context)
    return asyncio.run(answer) if inspect.iscoroutine(answer) else answer  # asyncCommunication: TorchServe awaits it


@pytest.mark.parametrize("asynchronous", [True, False], ids=["asyncCommunication", "batches"])
def test_handler_answers_each_request_with_its_own_status(handler_setup, captioner, caplog, monkeypatch, asynchronous):
    handler, context, _ = handler_setup
    monkeypatch.setattr(handler, "asynchronous", asynchronous)
    declared = {kind: set(names) for kind, names in context.metrics.cache.items()}
    rows = [{"body": bytearray(PNGS[0])}, {"body": bytearray()}, {"body": "hi"},
            {"data": bytearray(PNGS[1]), "decoding": bytearray(b"beam")}]
    headers = [RAW, RAW, {"Content-Type": "text/plain"}, FORM]
    with caplog.at_level(logging.INFO):
        bodies = _run_batch(handler, context, rows, headers)
    assert [context.get_response_status(i)[0] for i in range(4)] == [200, 400, 415, 200]
    assert context.get_response_status(2)[1] == "Unsupported Media Type"
    assert all(context.get_response_content_type(i) == "application/json" for i in range(4))
    expected = captioner.caption_images([IMAGES[0]], handler.service.defaults).captions[0]
    assert bodies[0]["token_ids"] == expected.token_ids and bodies[0]["caption"] == expected.caption
    assert bodies[1]["code"] == 400 and "empty request" in bodies[1]["message"]
    # Every metric the handler emits is declared in serving/metrics.yaml (or prometheus would drop it).
    assert {kind: set(names) for kind, names in context.metrics.cache.items()} == declared
    # TorchServe's metric log lines: [METRICS]Name.Unit:value|#dimensions|...
    emitted = {line[len("[METRICS]"):].split(".")[0]: float(line.split(":", 1)[1].split("|")[0])
               for line in (r.getMessage() for r in caplog.records) if line.startswith("[METRICS]Clipcap")}
    assert 1 <= emitted["ClipcapBatchSize"] <= handler.service.config.batch_rows  # rows sharing a decode step
    batches = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("[METRICS]ClipcapBatches.")]
    rows = int(emitted["ClipcapBatchSize"])
    assert len(batches) == 1 and f"|#ModelName:clipcap,Level:Model,BatchSizeUpTo:{batch_size_bucket(rows)}|" in batches[0]
    assert emitted["ClipcapTokensGenerated"] == len(bodies[0]["token_ids"]) + len(bodies[3]["token_ids"])
    assert all(emitted[f"Clipcap{stage}Seconds"] > 0 for stage in ("Preprocess", "Encode", "Decode"))


def test_handler_refuses_bad_config(handler_setup, capfd):
    _, context, module = handler_setup
    context.model_yaml_config = {"handler": {"backend": "nope"}}
    try:
        with pytest.raises(ServingConfigError, match="handler.backend 'nope'"):
            module.ClipCapHandler().initialize(context)
        # TorchServe logs a worker's stderr at WARN in model_log.log, its stdout (logging's) at INFO
        err = capfd.readouterr().err.splitlines()
        assert err[0].startswith("ERROR clipcap cannot start: model-config.yaml: handler.backend 'nope'")
    finally:
        context.model_yaml_config = yaml.safe_load((SERVING / "model-config.yaml").read_text())


# -- the archive and the server config --------------------------------------------------------------

def test_server_config_is_safe_and_fits_the_largest_request():
    properties = dict(line.split("=", 1) for line in (SERVING / "config.properties").read_text().splitlines()
                      if line and not line.startswith("#"))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert properties[key].startswith("http://127.0.0.1:")
    # TorchServe 0.12 always opens its two gRPC ports too (7070, 7071 unless set): set, so that a copy
    # for a second server shows every port to change; the workers' socket files are named after initial_worker_port.
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    ports = [int(properties[key].rsplit(":", 1)[1]) for key in ("inference_address", "management_address",
                                                                 "metrics_address")]
    ports += [int(properties[key]) for key in ("grpc_inference_port", "grpc_management_port")]
    assert len(set(ports)) == 5 and int(properties["initial_worker_port"]) not in ports
    assert properties["disable_token_authorization"] == "false"
    assert properties["metrics_mode"] == "prometheus"
    handler = ServingConfig.from_dict(yaml.safe_load((SERVING / "model-config.yaml").read_text())["handler"])
    largest_json = 4 * -(-handler.max_body_bytes // 3) + 1024  # base64 of the largest image + JSON and options
    assert int(properties["max_request_size"]) >= largest_json


# -- hostile clients: bounded replies, request forms, numeric edges ---------------------------------

MAX_MESSAGE = 1000  # a refusal quotes at most a short prefix of what it refuses (clipcap.quoting)
VALID_JSON = {"image": _b64(PNGS[0])}
FIELD = {"content-type": ""}  # how TorchServe's headers mark a text field or a query-string parameter
FILE = {"content-type": "image/png"}  # ... and a file part


def _json_bytes(**options) -> bytearray:
    return bytearray(json.dumps({**VALID_JSON, **options}).encode())


HOSTILE = [  # (name, row, headers, status): what a hostile client's probe sent, and its relatives
    ("7 MB decoding string", {"body": _json_bytes(decoding="A" * 7_000_000)}, JSON, 413),
    ("max_tokens list of 1e6 ints", {"body": _json_bytes(max_tokens=list(range(1_000_000)))}, JSON, 400),
    ("deep nesting", {"body": bytearray(b"[" * 100_000)}, JSON, 400),
    ("deep nesting in an option", {"body": _json_bytes(decoding=0)[:-1] + b', "top_p": ' + b"[" * 100_000 + b"}"},
     JSON, 400),
    ("nested option", {"body": _json_bytes(top_p={"a": [1, 2]})}, JSON, 400),
    ("null option", {"body": _json_bytes(max_tokens=None)}, JSON, 400),  # not "the bundle's": past handler.max_tokens
    ("100k unknown keys", {"body": bytearray(json.dumps({**VALID_JSON, **{f"k{i}": 1 for i in range(100_000)}})
                                             .encode())}, JSON, 413),
    ("long unknown key", {"body": _json_bytes(**{"u" * 3000: 1})}, JSON, 400),
    ("huge integer", {"body": _json_bytes(seed=9 ** 4000)}, JSON, 400),
    ("integer past JSON's digit limit", {"body": _json_bytes(seed=0)[:-2] + b"9" * 5000 + b"}"}, JSON, 400),
    ("repeated JSON key", {"body": bytearray(b'{"image": "' + _b64(PNGS[0]).encode() + b'", "decoding": "beam", '
                                             b'"decoding": "greedy"}')}, JSON, 400),
    ("already-decoded 7 MB string", {"body": {**VALID_JSON, "decoding": "B" * 7_000_000}}, JSON, 413),
    ("5 MB form field", {"data": bytearray(PNGS[0]), "decoding": bytearray(b"C" * 5_000_000)},
     {**FORM, "data": FILE, "decoding": FIELD}, 413),
    ("5 MB content type", {"body": bytearray(PNGS[0])}, {"Content-Type": "x/" + "D" * 5_000_000}, 415),
    ("binary unknown field", {"data": bytearray(PNGS[0]), "\x00\xff" * 40: bytearray(b"1")},
     {**FORM, "data": FILE, "\x00\xff" * 40: FIELD}, 400),
]


@pytest.mark.parametrize("name, row, headers, status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_a_short_refusal_and_its_batch_mates_their_captions(service, captioner, name, row,
                                                                                 headers, status):
    valid = [{"body": bytearray(PNGS[i])} for i in range(3)]
    replies, stats = service.caption_batch(parse_rows(service, valid[:2] + [row] + valid[2:], [RAW] * 2 + [headers]
                                                               + [RAW]))
    assert replies[2].status == status, replies[2].body
    assert len(json.dumps(replies[2].body)) < MAX_MESSAGE, replies[2].body["message"][:2000]
    expected = captioner.caption_images(IMAGES[:3], service.defaults).captions
    assert [r.body["token_ids"] for r in replies[:2] + replies[3:]] == [c.token_ids for c in expected]
    assert stats.captioned == 3


def test_unknown_form_field_is_named_as_an_unknown_option(service):
    row = {"data": bytearray(PNGS[0]), "note": bytearray(b"hello"), "decoding": bytearray(b"beam")}
    with pytest.raises(ServingError, match=r"unknown option\(s\) 'note'") as error:
        parse_row(service, row, {**FORM, "data": FILE, "note": FIELD, "decoding": FIELD})
    assert error.value.status == 400
    with pytest.raises(ServingError, match="exactly one file part .*got 2 file parts: 'data', 'other'"):
        parse_row(service, {"data": bytearray(PNGS[0]), "other": bytearray(PNGS[1])}, {**FORM, "data": FILE, "other": FILE})
    with pytest.raises(ServingError, match="got 0 file parts"):
        parse_row(service, {"decoding": bytearray(b"beam")}, {**FORM, "decoding": FIELD})
    with pytest.raises(ServingError, match=r"unknown option\(s\) 'body'"):  # a field's name, not the raw body's key
        parse_row(service, {"data": bytearray(PNGS[0]), "body": bytearray(b"x")}, {**FORM, "data": FILE, "body": FIELD})


@pytest.mark.parametrize("names", [["data", "data"], ["decoding", "data", "decoding"]])
def test_repeated_parts_and_fields_are_refused(service, names):
    """TorchServe's row keeps the last of a repeated name; the handler lists every name under PART_NAMES."""

    row = {"data": bytearray(PNGS[0]), "decoding": bytearray(b"beam")}
    headers = {**FORM, "data": FILE, "decoding": FIELD, PART_NAMES: names}
    with pytest.raises(ServingError, match="sent more than once") as error:
        parse_row(service, row, headers)
    assert error.value.status == 400 and repr(names[0]) in error.value.message
    assert parse_row(service, row, {**headers, PART_NAMES: ["data", "decoding"]}).options.strategy == "beam"
    assert parse_row(service, row, {**headers, PART_NAMES: "data,data"}).options.strategy == "beam"  # not the handler's


def test_query_string_parameters_are_fields(service):
    """Where TorchServe passes the query string (/invocations, /{model}/predict) its parameters are fields:
    honoured like form fields in every request form; given twice (also in the JSON body) is a 400."""
    beam = service.defaults.replace(strategy="beam", beam_size=3)
    query = {"decoding": bytearray(b"beam"), "beam_size": bytearray(b"3"), "model_name": bytearray(b"clipcap")}
    query_headers = {name: FIELD for name in query}
    raw = parse_row(service, {**query, "body": bytearray(PNGS[0])}, {**RAW, **query_headers})
    as_json = parse_row(service, {**query, "body": _json_bytes()}, {**JSON, **query_headers})
    form = parse_row(service, {**query, "data": bytearray(PNGS[0])}, {**FORM, **query_headers, "data": FILE})
    assert raw.options == as_json.options == form.options == beam
    with pytest.raises(ServingError, match=r"option\(s\) 'decoding' given twice") as error:
        parse_row(service, {**query, "body": _json_bytes(decoding="greedy")}, {**JSON, **query_headers})
    assert error.value.status == 400
    with pytest.raises(ServingError, match=r"unknown option\(s\) 'colour'"):
        parse_row(service, {"colour": bytearray(b"red"), "body": bytearray(PNGS[0])}, {**RAW, "colour": FIELD})


def test_request_ids_in_log_lines(service, caplog, monkeypatch):
    """Log lines name a request by the server's id and the client's X-Request-ID, quoted (no forged lines)."""
    rows = [{"body": bytearray(b"junk")}, {"body": bytearray(b"junk")}, {"body": bytearray(PNGS[1])}]
    headers = [{**RAW, "X-Request-ID": "client-7"}, {**RAW, "x-request-id": "bad id\nforged log line"}, RAW]
    with caplog.at_level(logging.INFO, logger="clipcap.serving"):
        parsed = parse_rows(service, rows, headers, ["ts-0", "ts-1", "ts-2"])
    assert [r.request_id for r in parsed] == ["ts-0 (X-Request-ID 'client-7')",
                                              "ts-1 (X-Request-ID 'bad id\\nforged log line')", "ts-2"]
    messages = [record.getMessage() for record in caplog.records]
    assert "request ts-0 (X-Request-ID 'client-7') refused: 400" in messages[0]
    assert all("\n" not in message for message in messages)
    def fail(pixels):
        raise RuntimeError("simulated")

    monkeypatch.setattr(service.captioner.runtime, "encode", fail)
    with caplog.at_level(logging.INFO, logger="clipcap.serving"):
        replies, _ = service.caption_batch(parse_rows(service, rows[2:], headers[2:], ["ts-9"]))
    assert replies[0].status == 500
    assert any("request ts-9: captioning failed" in r.getMessage() and r.exc_info for r in caplog.records)


FLOATS = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(
    [5e-324, 1e-320, 1e-45, 1e-38, 1e-30, 1e-8, 1.0, 10.0, 10.000001, 1e308, -0.0, -1e-38])


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=FLOATS, top_p=FLOATS)
def test_any_float_option_gives_a_caption_or_a_clean_refusal(service, strategy, temperature, top_p):
    """Temperature and top_p over the whole float range, through the JSON request path (the
    float as JSON text, as a client sends it): a 200 of real tokens or a 400 naming the option, never a 500.
    Each strategy gets the options it uses (greedy uses neither: refused by name whatever the value)."""
    used = {"greedy": {}, "beam": {"beam_size": 3}, "nucleus": {"seed": 1, "top_p": top_p}}[strategy]
    body = json.dumps({**VALID_JSON, "decoding": strategy, "max_tokens": 6, "temperature": temperature,
                       **used}).encode()  # NaN/Infinity as Python writes them
    replies, _ = service.caption_batch(parse_rows(service, [{"body": bytearray(body)}], [JSON]))
    reply = replies[0]
    valid = strategy != "greedy" and 0 < temperature <= 10 and (strategy != "nucleus" or 0 < top_p <= 1)
    if not valid:
        assert reply.status == 400 and ("temperature" in reply.body["message"] or "top_p" in reply.body["message"])
        return
    assert reply.status == 200, reply.body
    tokens = reply.body["token_ids"]
    assert 1 <= len(tokens) <= 6 and all(0 <= t < service.captioner.config.gpt2.vocab_size for t in tokens)
    if temperature < 1e-30:  # the greedy limit (nucleus and beam alike; ties aside, which random weights lack)
        greedy = parse_rows(service, [{"body": _json_bytes(max_tokens=6)}], [JSON])
        assert tokens == service.caption_batch(greedy)[0][0].body["token_ids"]


def test_healthcheck_image_and_refused_connection(tmp_path, capsys):
    """serving/healthcheck.py without a server: its built-in PNG is an image the service accepts, and a
    server that does not answer is unhealthy (exit 1). The real checks are in tests/test_serving_e2e.py."""
    from clipcap_bench.torchserve import free_ports
    from clipcap.images import decode_image

    spec = importlib.util.spec_from_file_location("clipcap_healthcheck", SERVING / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert decode_image(healthcheck.tiny_png()).size == (8, 8)
    (port,) = free_ports(1)
    assert healthcheck.main(["--url", f"http://127.0.0.1:{port}", "--timeout", "2",
                             "--key-file", str(tmp_path / "absent.json")]) == 1
    assert "unhealthy: no caption within 2.0 s" in capsys.readouterr().err


def test_batch_size_buckets_are_powers_of_two_on_both_fronts():
    """ClipcapBatchSize counts batch sizes in le=1, 2, 4, 8 ... buckets, not latency buckets (0.005 .. 10)."""
    from clipcap.serving.service import BATCH_SIZE_BUCKETS, batch_size_bucket
    from clipcap.serving.ray_serve import BATCH_SIZE_BOUNDARIES

    assert BATCH_SIZE_BUCKETS[:6] == (1, 2, 4, 8, 16, 32) and BATCH_SIZE_BUCKETS[-1] >= 256
    assert BATCH_SIZE_BOUNDARIES == [float(b) for b in BATCH_SIZE_BUCKETS]
    assert [batch_size_bucket(size) for size in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    assert batch_size_bucket(10**6) == BATCH_SIZE_BUCKETS[-1]


def test_a_worker_warms_up_each_batch_size_bucket_before_it_is_ready(tiny_bundle, tmp_path, monkeypatch):
    """from_archive (TorchServe's initialize) captions the built-in image once per power-of-two batch size up
    to batchSize, and batchSize itself, through the request path, before it returns."""
    from clipcap.serving.service import warm_up_sizes

    assert [warm_up_sizes(n) for n in (1, 2, 6, 8)] == [[1], [1, 2], [1, 2, 4, 6], [1, 2, 4, 8]]
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    calls = []
    caption = CaptionService.caption_batch
    monkeypatch.setattr(CaptionService, "caption_batch",
                        lambda self, requests: calls.append(len(requests)) or caption(self, requests))
    service = CaptionService.from_archive(tmp_path, {"batchSize": 6})
    assert calls == [1, 2, 4, 6]
    replies, _ = service.caption_batch(parse_rows(service, [{"body": bytearray(PNGS[0])}], [RAW]))
    assert replies[0].status == 200 and calls == [1, 2, 4, 6, 1]


def _healthcheck():
    spec = importlib.util.spec_from_file_location("clipcap_healthcheck", SERVING / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    return healthcheck


def _content_length(request: bytes) -> int:
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def test_healthcheck_reads_either_token_file_and_says_when_a_port_is_not_http(tmp_path, capsys):
    """TorchServe's key_file.json and Ray Serve's serve-ray-token (the token alone) both authorize the check;
    a port that answers something other than HTTP is exit 1 with a one-line reason, no traceback."""
    import http.server
    import socketserver

    healthcheck = _healthcheck()
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers["Authorization"])
            body = json.dumps({"caption": "a red square", "token_ids": [1, 2]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Garbage(socketserver.BaseRequestHandler):
        def handle(self):  # reads the whole request first, so the client never meets a closed socket mid-send
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
                chunk = self.request.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "ts-key"}}))
    (tmp_path / "serve-ray-token").write_text("ray-token\n")
    (tmp_path / "bad.json").write_text('{"management": {"key": "x"}}')
    for server_class, handler in ((http.server.HTTPServer, Handler), (socketserver.TCPServer, Garbage)):
        with server_class(("127.0.0.1", 0), handler) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{server.server_address[1]}"
            try:
                if handler is Handler:
                    for name in ("key_file.json", "serve-ray-token"):
                        assert healthcheck.main(["--url", url, "--key-file", str(tmp_path / name)]) == 0
                    assert seen == ["Bearer ts-key", "Bearer ray-token"]
                    assert healthcheck.main(["--url", url, "--key-file", str(tmp_path / "bad.json")]) == 1
                    assert "without TorchServe's inference key" in capsys.readouterr().err
                else:
                    assert healthcheck.main(["--url", url, "--timeout", "5"]) == 1
                    err = capsys.readouterr().err
                    assert err.startswith("unhealthy: ") and "does not answer HTTP" in err and "Traceback" not in err
            finally:
                server.shutdown()
