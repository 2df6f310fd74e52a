"""The Ray-free parts of the Ray Serve front: HTTP request -> Form (clipcap.serving.form), the
Open Inference Protocol codec (clipcap.serving.oip) checked against tritonclient's own encoder and decoder,
and CaptionFront answering the shared request table over a real CaptionService in this process."""
import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.serving import oip
from clipcap.captioner import Captioner
from clipcap.serving.form import PART_NAMES, Part, from_torchserve, read_form
from clipcap.images import decode_image
from clipcap.serving.service import CaptionService
from clipcap.serving.config import ServingConfig
from clipcap.serving.front import BAD_TOKEN, CaptionFront, FrontConfig
from clipcap.serving.ray_serve import BatchSettings, RayServeConfig, resolve_token
from conftest import png_bytes, random_images
from serving_cases import BOUNDARY, cases, message, multipart

ROOT = Path(__file__).resolve().parents[1]  # the checkout: paths below never depend on pytest's working directory

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

field_names = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(field_names, st.binary(max_size=300)), max_size=5), st.binary(max_size=2000))
def test_multipart_parts_arrive_in_order_with_their_types(fields, image):
    """Text fields (repeats included) then a file part: every part in order, a text field's type '' and
    the file's its own; the same request from TorchServe's row (which keeps one value per name, the
    handler recording every name) reads as the same names and types."""
    body, headers = multipart(image, {})
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
             for name, value in fields]
    form = read_form(headers, b"".join(parts) + body)
    assert [(p.name, p.value, p.content_type) for p in form.parts] == [(n, v, "") for n, v in fields] + [("data", image, "image/png")]
    assert form.content_type == "multipart/form-data" and form.part("data").is_file
    assert not any(part.is_file for part in form.parts[:-1])
    row = {part.name: part.value for part in form.parts}
    row_headers = {**headers, **{p.name: {"content-type": p.content_type} for p in form.parts},
                   PART_NAMES: [p.name for p in form.parts]}
    torchserve = from_torchserve(row, row_headers)
    assert [(p.name, p.content_type) for p in torchserve.parts] == [(p.name, p.content_type) for p in form.parts]
    assert torchserve.content_type == form.content_type


def test_bodies_and_query_strings_as_forms():
    form = read_form({"Content-Type": "image/png"}, b"\x89PNG")
    assert form.parts == (Part("body", b"\x89PNG", "image/png"),) and form.content_type == "image/png"
    form = read_form({}, b"", "beam_size=3&seed=")
    assert form.parts == (Part("beam_size", b"3", ""), Part("seed", b"", ""), Part("body", b"", ""))
    # a multipart body without a boundary is the body, as TorchServe hands it on; without its closing one, no part
    assert read_form({"content-type": "multipart/form-data"}, b"junk").parts == (Part("body", b"junk", "multipart/form-data"),)
    unclosed = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n'.encode()
    assert read_form({"content-type": f"multipart/form-data; boundary={BOUNDARY}"}, unclosed).parts == ()
    # TorchServe's row: a header that names itself like the part list but is no list cannot stand in for it
    assert [p.name for p in from_torchserve({"body": b"x"}, {PART_NAMES: "x,x"}).parts] == ["body"]
    # without the part's own entry in the headers, an option name is a field and any other name a file
    names = from_torchserve({"decoding": b"beam", "photo": b"..."}, {}).parts
    assert [(p.name, p.is_file) for p in names] == [("decoding", False), ("photo", True)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_bytes_tensor_round_trip(items):
    assert oip.deserialize_bytes(oip.serialize_bytes(items)) == items


@pytest.mark.parametrize("blob", [b"\x05\x00\x00", b"\x05\x00\x00\x00abc"])
def test_truncated_bytes_tensor_is_refused(blob):
    with pytest.raises(oip.ProtocolError):
        oip.deserialize_bytes(blob)


@pytest.fixture(scope="module")
def service(tiny_bundle):
    return CaptionService(Captioner.from_path(tiny_bundle), ServingConfig())


@pytest.fixture(scope="module")
def images():
    return [png_bytes(image) for image in random_images(3)]


def _front(service, token=TOKEN, **config) -> CaptionFront:
    return CaptionFront(FrontConfig(token=token, **config), service)


async def _chunks(body: bytes, size: int = 65536):
    for start in range(0, len(body), size):
        yield body[start:start + size]


def _ask(front, method, path, body=b"", headers=None, query=""):
    answer = asyncio.run(front.answer(method, path, query, {**AUTH, **(headers or {})}, _chunks(body)))
    return answer.status, answer.body, answer.headers


def test_the_shared_table(service, images):
    front, captioner = _front(service), service.captioner
    with_options = captioner.default_options().replace(strategy="beam", beam_size=3, max_tokens=12)
    for case in (case for case in cases(images[0]) if not case.over_http):
        path, _, query = case.path.partition("?")
        status, body, _ = _ask(front, case.method, path, case.body, case.headers, query)
        expected_status, fragment = case.expected("in-process")
        assert status == expected_status, f"{case.name}: {status} {body[:300]}"
        if status == 200:
            reply = json.loads(body)
            options = with_options if case.fragment == "options" else captioner.default_options()
            expected = captioner.caption_images([decode_image(images[0])], options).captions[0]
            assert (reply["caption"], reply["token_ids"]) == (expected.caption, expected.token_ids), case.name
        else:
            assert fragment in message(body) and len(body) < 1000, f"{case.name}: {body[:300]}"


def test_token_and_routes(service, images):
    front = _front(service)
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, body, _ = _ask(front, "POST", "/predictions/clipcap", images[0], headers)
        assert (status, json.loads(body)) == (400, {"code": 400, "type": "InvalidKeyException", "message": BAD_TOKEN})
        status, body, _ = _ask(front, "GET", "/v2/models/clipcap", headers=headers)
        assert (status, json.loads(body)) == (401, {"error": BAD_TOKEN})
    assert _ask(front, "GET", "/v2/health/ready", headers={"Authorization": ""})[:2] == (200, b'{"ready": true}')
    assert _ask(front, "GET", "/ping")[:2] == (200, b'{"status": "Healthy"}')
    assert json.loads(_ask(front, "POST", "/predictions/other", images[0])[1])["type"] == "ModelNotFoundException"
    assert _ask(front, "GET", "/predictions/clipcap")[0] == 400  # TorchServe 0.12 hands it on: "empty request"
    # /invocations and /<model>/predict pass the query string on as fields; /predictions drops it (TorchServe's routes)
    beam = _library(service, images[:1], strategy="beam", beam_size=3)[0].token_ids
    greedy = _library(service, images[:1])[0].token_ids
    for path, query, expected in [("/invocations", "model_name=clipcap&decoding=beam&beam_size=3", beam),
                                  ("/clipcap/predict", "decoding=beam&beam_size=3", beam),
                                  ("/predictions/clipcap", "decoding=beam&beam_size=3", greedy)]:
        status, body, _ = _ask(front, "POST", path, images[0], {"Content-Type": "image/png"}, query)
        assert status == 200 and json.loads(body)["token_ids"] == expected, path
    status, body, _ = _ask(front, "POST", "/clipcap/predict", images[0], {"Content-Type": "image/png"},
                           "decoding=beam&decoding=greedy")
    assert status == 400 and "sent more than once" in json.loads(body)["message"]
    # the request id: the client's X-Request-ID (Ray Serve's proxy sets one when the client does not)
    assert _ask(front, "GET", "/ping", headers={"X-Request-ID": "client-7"})[2]["x-request-id"] == "client-7"
    assert len(_ask(front, "GET", "/ping")[2]["x-request-id"]) == 32
    assert _ask(_front(service, token=None), "POST", "/predictions/clipcap", images[0],
                {"Authorization": "", "Content-Type": "image/png"})[0] == 200


def test_request_size_limit_before_and_while_reading(service, images):
    front = _front(service, max_request_bytes=1000)
    big = b"\0" * 1001
    assert _ask(front, "POST", "/predictions/clipcap", big, {"Content-Length": "1001"})[0] == 413
    assert _ask(front, "POST", "/predictions/clipcap", big)[0] == 413  # chunked: no Content-Length
    assert _ask(front, "POST", "/v2/models/clipcap/infer", big)[0] == 413


def _library(service, data: list[bytes], **options):
    captioner = service.captioner
    return captioner.caption_images([decode_image(d) for d in data],
                                    captioner.default_options().replace(**options)).captions


def test_v2_infer_json_several_images(service, images):
    front = _front(service)
    request = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                       "data": [base64.b64encode(d).decode() for d in images]}],
               "parameters": {"decoding": "beam", "beam_size": 2}}
    status, body, headers = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(request).encode(),
                                 {"Content-Type": "application/json"})
    reply = json.loads(body)
    assert status == 200, reply
    outputs = {o["name"]: o for o in reply["outputs"]}
    expected = _library(service, images, strategy="beam", beam_size=2)
    assert reply["id"] == "r1" and outputs["caption"]["data"] == [c.caption for c in expected]
    width = max(len(c.token_ids) for c in expected)
    assert outputs["token_ids"]["shape"] == [3, width]
    rows = np.array(outputs["token_ids"]["data"]).reshape(3, width)
    assert [[t for t in row if t != oip.TOKEN_PAD] for row in rows.tolist()] == [c.token_ids for c in expected]


def test_v2_infer_one_bad_image_fails_the_request_with_its_index(service, images):
    front = _front(service)
    data = [base64.b64encode(d).decode() for d in (images[0], b"junk")]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]}
    status, body, _ = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(request).encode())
    assert status == 400 and json.loads(body)["error"].startswith("image 1 of 2: ")
    for bad, fragment in [({"inputs": []}, "exactly one input"),
                          ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
                          ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data[:1]}]}, "shape"),
                          ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [17], "data": data * 9}]}, "limit"),
                          ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": data[:1]}],
                            "parameters": {"url": "x"}}, "unknown option"),
                          ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": data[:1]}],
                            "parameters": {"image": data[0]}}, "not a parameter"),
                          (["not", "an", "object"], "JSON object")]:
        status, body, _ = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(bad).encode())
        assert status == 400 and fragment in json.loads(body)["error"], (bad, body)
    too_long = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": data[:1]}],
                "parameters": {"decoding": "A" * 5000}}  # CaptionService's JSON limits apply to each image's row
    status, body, _ = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(too_long).encode())
    assert status == 413 and "max_options_bytes" in json.loads(body)["error"] and len(body) < 1000


def test_v2_infer_with_tritonclient_encoding(service, images):
    """tritonclient.http's own request encoder (binary BYTES input) and response decoder."""
    http = pytest.importorskip("tritonclient.http")
    front = _front(service)
    image = http.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    outputs = [http.InferRequestedOutput("caption", binary_data=True), http.InferRequestedOutput("token_ids")]
    body, header_length = http.InferenceServerClient.generate_request_body([image], outputs,
                                                                           parameters={"seed": 7, "decoding": "nucleus"})
    headers = {} if header_length is None else {oip.HEADER_LENGTH: str(header_length)}
    status, reply, reply_headers = _ask(front, "POST", "/v2/models/clipcap/infer", body, headers)
    assert status == 200, reply
    length = reply_headers.get(oip.HEADER_LENGTH)
    result = http.InferResult.from_response_body(reply, header_length=None if length is None else int(length))
    expected = [_library(service, [d], strategy="nucleus", seed=7 + i)[0] for i, d in enumerate(images)]
    assert [c.decode() for c in result.as_numpy("caption")] == [c.caption for c in expected]
    assert [[t for t in row if t != oip.TOKEN_PAD] for row in result.as_numpy("token_ids").tolist()] == \
        [c.token_ids for c in expected]


def test_model_config_batching_and_token_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the checkout
    settings_ = BatchSettings.from_file(ROOT / "serving" / "model-config.yaml")
    assert (settings_.handler.batch_rows, settings_.handler.max_queued) == (16, 64)
    (tmp_path / "bad.yaml").write_text("handler:\n  batch_rows: 0\n")
    with pytest.raises(ValueError, match="batch_rows"):
        BatchSettings.from_file(tmp_path / "bad.yaml")
    token_file = tmp_path / "token"
    token_file.write_text("old")
    os.chmod(token_file, 0o644)
    token = resolve_token(RayServeConfig(bundle="x", token_file=str(token_file)))
    assert token_file.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert resolve_token(RayServeConfig(bundle="x", token="given", token_file=str(tmp_path / "no"))) == "given"
    assert resolve_token(RayServeConfig(bundle="x", no_auth=True)) is None
    assert not (tmp_path / "no").exists()


def test_the_rayservice_manifest_builds_the_application(monkeypatch, tmp_path):
    """serving/kserve/rayservice.yaml's import_path and args build the app (paths moved to this checkout)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the serve-ray extra)")
    import importlib

    import yaml
    from ray.serve import Application

    monkeypatch.chdir(tmp_path)  # anywhere but the checkout
    manifest = yaml.safe_load((ROOT / "serving" / "kserve" / "rayservice.yaml").read_text())
    [app] = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    args = {**app["args"], "bundle": str(ROOT / "models" / "shapes-demo"),
            "model_config": str(ROOT / "serving" / "model-config.yaml")}
    with pytest.raises(ValueError, match="CLIPCAP_SERVE_TOKEN"):
        builder(args)
    monkeypatch.setenv("CLIPCAP_SERVE_TOKEN", "from-a-secret")
    built = builder(args)
    assert isinstance(built, Application)
    deployment = built._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == app["args"]["max_replicas"]
    assert deployment.init_args[2].token == "from-a-secret"
    from clipcap.serving import http_limits

    env = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": http_limits.CALLBACK} in env


def test_serve_ray_command_refuses_a_missing_model_config_before_starting_ray(tmp_path, capsys):
    from clipcap import cli

    assert cli.main(["serve-ray", "models/shapes-demo", "--model-config", str(tmp_path / "none.yaml"),
                     "--token-file", str(tmp_path / "token")]) == 2
    assert "none.yaml: file not found" in capsys.readouterr().err
    assert not (tmp_path / "token").exists()


def test_v2_binary_data_output_returns_every_output_as_binary():
    """parameters.binary_data_output: true asks for every output in the binary extension (and is no decoding
    option); false, or absent, answers JSON."""
    image = base64.b64encode(b"img").decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "parameters": {"binary_data_output": True, "decoding": "beam"}}
    request = oip.parse_infer(json.dumps(body).encode(), None, 8)
    assert request.binary_outputs == set(oip.OUTPUTS) and request.options == {"decoding": "beam"}
    payload, headers = oip.infer_response("clipcap", request, ["a square."], [[1, 2, 3]])
    length = int(headers[oip.HEADER_LENGTH])
    header = json.loads(payload[:length])
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in header["outputs"])
    assert oip.deserialize_bytes(payload[length:length + header["outputs"][0]["parameters"]["binary_data_size"]]) \
        == [b"a square."]
    for value in (False, None):
        body["parameters"]["binary_data_output"] = value
        request = oip.parse_infer(json.dumps(body).encode(), None, 8)
        assert request.binary_outputs == set()
        assert oip.infer_response("clipcap", request, ["a"], [[1]])[1] == {"content-type": "application/json"}


def test_v2_limits_at_their_boundaries():
    """max_images images are accepted, one more is refused; a header length past the body is refused."""
    def body(count):
        return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                                       "data": ["aW1n"] * count}]}).encode()

    assert len(oip.parse_infer(body(4), None, 4).images) == 4
    with pytest.raises(oip.ProtocolError, match="holds more than 4 images"):
        oip.parse_infer(body(5), None, 4)
    whole = body(1)
    assert len(oip.parse_infer(whole, str(len(whole)), 4).images) == 1  # a header that is the whole body
    for length in (str(len(whole) + 1), "-1"):
        with pytest.raises(oip.ProtocolError, match="Inference-Header-Content-Length is"):
            oip.parse_infer(whole, length, 4)


def _v2(data: list[str], **tensor) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data, **tensor}]}


def test_v2_refuses_a_giant_shape_and_a_long_id_with_a_bounded_message(service, images):
    """A shape of 15,000 twos (its product has 4,516 digits) and sizes too big to print are a 400 of a few
    hundred bytes; an id over oip.MAX_ID_CHARS is refused, not echoed; one at the limit is echoed whole."""
    front, data = _front(service), [base64.b64encode(images[0]).decode()]
    for tensor in ({"shape": [2] * 15000}, {"shape": [10**4000, 1]}, {"shape": [1] * 100_000 + [17]},
                   {"shape": [1], "parameters": {"binary_data_size": 10**4000}}):
        status, body, _ = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(_v2(data, **tensor)).encode())
        assert status == 400 and len(body) < 600, (tensor.get("shape", [])[:3], body[:300])
    for size, status in ((oip.MAX_ID_CHARS, 200), (oip.MAX_ID_CHARS + 1, 400), (10 * 2**20, 400)):
        request = {"id": "i" * size, **_v2(data)}
        answer_status, body, _ = _ask(front, "POST", "/v2/models/clipcap/infer", json.dumps(request).encode())
        assert answer_status == status and len(body) < 2000, (size, body[:200])
        if status == 200:
            assert json.loads(body)["id"] == "i" * size


def test_a_body_that_does_not_arrive_in_time_is_408_and_closes_the_connection(service, images):
    """The body's deadline (FrontConfig.body_timeout_s): a client that sends a byte and then nothing more."""
    front = _front(service, body_timeout_s=0.2)

    async def one_byte_then_silence():
        yield images[0][:1]
        await asyncio.Event().wait()  # never set: the rest never comes

    for path in ("/predictions/clipcap", "/v2/models/clipcap/infer"):
        answer = asyncio.run(front.answer("POST", path, "", {**AUTH, "Content-Type": "image/png"},
                                          one_byte_then_silence()))
        assert answer.status == 408 and answer.headers["connection"] == "close", answer
        assert "did not arrive within 0.2 s (1 bytes came)" in message(answer.body)
    assert _ask(front, "POST", "/predictions/clipcap", images[0], {"Content-Type": "image/png"})[0] == 200


def test_the_front_logs_each_refusal_it_makes_without_the_token(service, images, caplog):
    front = _front(service, max_request_bytes=1000)
    caplog.set_level("INFO", logger="clipcap")
    _ask(front, "POST", "/predictions/clipcap", images[0], {"Authorization": "Bearer not-the-token",
                                                            "X-Request-ID": "r-auth"})
    _ask(front, "POST", "/predictions/clipcap", b"\0" * 1001, {"Content-Length": "1001", "X-Request-ID": "r-big"})
    _ask(front, "GET", "/v2/models/clipcap/versions/1", headers={"X-Request-ID": "r-v2"})
    _ask(front, "POST", "/predictions/clipcap", b"\0" * 10, {"Content-Type": "image/png", "X-Request-ID": "r-bad"})
    lines = [record.getMessage() for record in caplog.records]
    for request_id, fragment in (("r-auth", "400 Token Authorization failed"), ("r-big", "413 request body of '1001'"),
                                 ("r-v2", "404 v2 endpoint not found")):
        assert any(line.startswith(f"request {request_id} refused: {fragment}") for line in lines), (request_id, lines)
    # CaptionService's refusal is logged once, by CaptionService (the front does not repeat it)
    assert sum("r-bad" in line for line in lines) == 1
    assert not any(TOKEN in line or "not-the-token" in line for line in lines)


def _proxy_call(middleware, headers: list[tuple[bytes, bytes]], path: str = "/predictions/clipcap"):
    """One request through the proxy middleware: (status, body, whether the app ran, whether the body was read)."""
    events = {"app": False, "receive": False}
    sent = []

    async def app(scope, receive, send):
        events["app"] = True

    async def receive():
        events["receive"] = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers}
    asyncio.run(middleware(app)(scope, receive, send))
    status = sent[0]["status"] if sent else None
    return status, b"".join(m.get("body", b"") for m in sent[1:]), events["app"], events["receive"]


def test_the_proxy_limits_answer_from_the_head_before_any_body_byte(caplog):
    """clipcap.serving.http_limits in Ray Serve's proxy: a head over 16 KiB is 431 and a Content-Length over the body
    limit 413, both before the body is read (so no "100 Continue" goes out), logged; the rest pass untouched."""
    from clipcap.serving import http_limits

    def middleware(app):
        return http_limits.RequestLimits(app, max_header_bytes=16 * 2**10, max_request_bytes=1000)

    caplog.set_level("INFO", logger="clipcap")
    small = [(b"host", b"x"), (b"content-length", b"1000"), (b"expect", b"100-continue")]
    assert _proxy_call(middleware, small) == (None, b"", True, False)
    status, body, app_ran, read = _proxy_call(middleware, small[:1] + [(b"content-length", b"1001"),
                                                                       (b"expect", b"100-continue")])
    assert (status, app_ran, read) == (413, False, False) and "over the limit of 1000 bytes" in message(body)
    huge = small + [(b"x-filler", b"a" * (16 * 2**10))]
    status, body, app_ran, read = _proxy_call(middleware, huge + [(b"x-request-id", b"r-431")], "/v2/models/clipcap/infer")
    assert (status, app_ran, read) == (431, False, False) and "over the limit of 16384 bytes" in json.loads(body)["error"]
    assert http_limits.head_bytes({"method": "GET", "path": "/", "query_string": b"", "headers": huge}) > 16 * 2**10
    assert any("'r-431'" in r.getMessage() and "431" in r.getMessage() for r in caplog.records)
    assert not any("aaaa" in r.getMessage() for r in caplog.records)
    # the callback Ray Serve calls in its proxy reads the limits from the environment
    [entry] = http_limits.proxy_middlewares()
    assert entry.cls is http_limits.RequestLimits


def test_the_token_file_is_never_written_through_a_symbolic_link(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    os.chmod(target, 0o644)
    link = tmp_path / "serve-ray-token"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        resolve_token(RayServeConfig(bundle="x", token_file=str(link)))
    assert target.read_text() == "precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a symbolic link"):
        resolve_token(RayServeConfig(bundle="x", token_file=str(dangling)))
    assert not (tmp_path / "nowhere").exists()


def test_the_embedded_ray_starts_on_loopback_without_dashboard_or_metrics(monkeypatch, tmp_path):
    """What RayServer asks of ray.init (caught before a Ray starts): loopback, no dashboard, metrics off unless
    asked for; the environment that keeps Ray's node address on loopback and puts http_limits in the proxy."""
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed (the serve-ray extra)")
    from clipcap.serving import http_limits
    from clipcap.serving.ray_serve import RayServer

    class Started(Exception):
        pass

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise Started

    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
                 http_limits.HEADER_LIMIT_ENV, http_limits.BODY_LIMIT_ENV):
        monkeypatch.setenv(name, "")  # recorded, so what RayServer sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    for metrics in (False, True):
        with pytest.raises(Started):
            RayServer(RayServeConfig(bundle="models/shapes-demo", metrics=metrics, metrics_port=9999,
                                     token_file=str(tmp_path / "t"))).__enter__()
        kwargs = calls[-1]
        assert kwargs["_node_ip_address"] == "127.0.0.1" and kwargs["include_dashboard"] is False
        assert kwargs["_system_config"] == {"enable_metrics_collection": metrics}
        assert kwargs["_metrics_export_port"] == (9999 if metrics else None)
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == http_limits.CALLBACK
    assert (os.environ[http_limits.HEADER_LIMIT_ENV], os.environ[http_limits.BODY_LIMIT_ENV]) == ("16384", "16777216")


def test_a_light_module_does_not_load_torch():
    """Ray Serve's proxy imports clipcap.serving.http_limits: `import clipcap` must not bring torch or Pillow."""
    import subprocess
    import sys

    code = "import sys, clipcap.serving.http_limits; print('torch' in sys.modules or 'PIL' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_serve_ray_refuses_a_token_file_symlink_before_starting_ray(tmp_path, capsys, monkeypatch):
    from clipcap import cli
    from clipcap.serving import http_limits
    from clipcap.serving.ray_serve import EMBEDDED_RAY_ENV

    for name in (*EMBEDDED_RAY_ENV, http_limits.HEADER_LIMIT_ENV, http_limits.BODY_LIMIT_ENV):
        monkeypatch.setenv(name, "")  # recorded, so what RayServer sets is undone after the test
        monkeypatch.delenv(name)

    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert cli.main(["serve-ray", "models/shapes-demo", "--token-file", str(tmp_path / "link")]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
