"""End to end: clipcap.mar on a real TorchServe (real Java) on free loopback ports, token auth on.

One session-scoped server serves every test; the last test stops it and checks that no process is
left behind. The demo bundle (models/shapes-demo) and samples/ are used when present, else the
tiny test bundle and random images.
"""
import asyncio
import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clipcap_bench.torchserve import free_ports
from clipcap.captioner import Captioner
from clipcap.export.mar import ArchiveConfig, build_archive
from clipcap.images import decode_image
from conftest import png_bytes, random_images
from serving_cases import OPTIONS, cases, message

ROOT = Path(__file__).resolve().parent.parent
DEMO_BUNDLE, SAMPLES = ROOT / "models" / "shapes-demo", ROOT / "samples"
START_TIMEOUT_S = 180  # Java start + a worker importing torch and loading the model, on a busy 2-core machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 11+ (make setup installs it)"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "torchserve").exists(),
                       reason="torchserve is not installed (pip install -e '.[serve]')"),
]


class TorchServe:
    """TorchServe started the documented way (torchserve --start) from serving/config.properties, with
    ports and paths moved into a private directory so it cannot collide with another server."""

    def __init__(self, root: Path, mar: Path):
        self.root = root
        self.inference, self.management, self.metrics, grpc_inference, grpc_management = free_ports(5)
        overrides = {"inference_address": f"http://127.0.0.1:{self.inference}",
                     "management_address": f"http://127.0.0.1:{self.management}",
                     "metrics_address": f"http://127.0.0.1:{self.metrics}",
                     "grpc_inference_port": str(grpc_inference), "grpc_management_port": str(grpc_management),
                     "model_store": str(mar.parent), "metrics_config": str(ROOT / "serving" / "metrics.yaml")}
        shipped = (ROOT / "serving" / "config.properties").read_text().splitlines()
        vmargs = next(line.split("=", 1)[1] for line in shipped if line.startswith("vmargs="))
        overrides["vmargs"] = vmargs.replace("=serving/", f"={ROOT / 'serving'}/")  # relative to the repository
        lines = [line for line in shipped if line.split("=", 1)[0] not in overrides]
        (root / "config.properties").write_text("\n".join(lines + [f"{k}={v}" for k, v in overrides.items()]) + "\n")
        (root / "tmp").mkdir()
        # TMPDIR holds TorchServe's pid file, TEMP the workers' sockets: both private to this server.
        self.env = {**os.environ, "TMPDIR": str(root / "tmp"), "TEMP": str(root / "tmp"), "OMP_NUM_THREADS": "2"}
        self.model = mar.stem
        self.processes = []

    def _torchserve(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "ts.model_server", *args], cwd=self.root, env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self, wait_for_worker: bool = True) -> None:
        import psutil

        self._torchserve("--start", "--ncs", "--ts-config", "config.properties",
                         "--models", f"{self.model}={self.model}.mar")
        java = psutil.Process(int((self.root / "tmp" / ".model_server.pid").read_text()))
        self.processes = [java]
        if not wait_for_worker:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not java.is_running():
                pytest.fail(f"TorchServe exited during start-up:\n{self.log_tail()}")
            if self._worker_ready():
                self.processes += java.children(recursive=True)  # the Python workers
                return
            time.sleep(1)
        pytest.fail(f"TorchServe not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def _worker_ready(self) -> bool:
        if not (self.root / "key_file.json").exists():
            return False
        try:
            status, body = self.get(self.management, f"/models/{self.model}", key="management")
        except (OSError, ValueError, KeyError):  # the key file may be half written, and is written before the ports open
            return False
        return status == 200 and any(w["status"] == "READY" for w in json.loads(body)[0]["workers"])

    def stop(self) -> list:
        """torchserve --stop; returns the processes still alive a minute later (killed, so none leak)."""
        import psutil

        if not self.processes:
            return []
        self._torchserve("--stop")
        _, alive = psutil.wait_procs(self.processes, timeout=60)
        for process in alive:
            process.kill()
        self.processes = []
        return alive

    def key(self, kind: str) -> str:
        return json.loads((self.root / "key_file.json").read_text())[kind]["key"]

    def request(self, port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                key: str | None = "inference") -> tuple[int, bytes]:
        headers = dict(headers or {})
        if key:
            headers["Authorization"] = f"Bearer {self.key(key)}"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, port: int, path: str, key: str | None = "inference") -> tuple[int, bytes]:
        return self.request(port, "GET", path, key=key)

    def predict(self, body: bytes, headers: dict | None = None, key: str | None = "inference") -> tuple[int, dict]:
        status, data = self.request(self.inference, "POST", f"/predictions/{self.model}", body, headers, key)
        return status, json.loads(data) if data else {}

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted((self.root / "logs").glob("*.log"))
        return "\n".join("\n".join(log.read_text(errors="replace").splitlines()[-lines:]) for log in logs)


@pytest.fixture(scope="session")
def served(request, tmp_path_factory):
    demo = (DEMO_BUNDLE / "clipcap.json").exists()
    bundle = DEMO_BUNDLE if demo else request.getfixturevalue("tiny_bundle")
    images = {p.name: p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))} if demo else {}
    if not images:
        images = {f"random-{i}.png": png_bytes(image) for i, image in enumerate(random_images(6))}
    root = tmp_path_factory.mktemp("torchserve")
    mar = build_archive(ArchiveConfig(bundle=bundle, handler=ROOT / "serving" / "handler.py",
                                      model_config=ROOT / "serving" / "model-config.yaml",
                                      out=root / "model_store" / "clipcap.mar"))
    server = TorchServe(root, mar)
    request.addfinalizer(server.stop)
    server.start()
    return server, bundle, images


def test_captions_equal_the_library(served):
    server, bundle, images = served
    captioner = Captioner.from_path(bundle)
    references_file = SAMPLES / "captions.json"
    references = json.loads(references_file.read_text()) if bundle == DEMO_BUNDLE and references_file.exists() else {}
    for name, data in images.items():
        status, body = server.predict(data, {"Content-Type": "image/png"})
        expected = captioner.caption_images([decode_image(data)]).captions[0]
        assert status == 200, body
        assert (body["caption"], body["token_ids"]) == (expected.caption, expected.token_ids), name
        assert set(body["timings_ms"]) == {"preprocess", "queue", "encode", "decode", "first_token"}
        # The demo model captions every sample right (card: 99.3% / 93.1% exact on held-out images).
        if name in references:
            assert body["caption"] in references[name], f"{name}: {body['caption']!r} not in {references[name]}"


def test_json_and_multipart_requests_with_options(served):
    server, bundle, images = served
    name, data = next(iter(images.items()))
    options = {"decoding": "beam", "beam_size": 3, "max_tokens": 12}
    captioner = Captioner.from_path(bundle)
    beam = captioner.default_options().replace(strategy="beam", beam_size=3, max_tokens=12)
    expected = captioner.caption_images([decode_image(data)], beam).captions[0]
    status, body = server.predict(json.dumps({"image": base64.b64encode(data).decode(), **options}).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200 and body["token_ids"] == expected.token_ids
    boundary = "clipcap-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in options.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="{name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    status, body = server.predict(b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and body["token_ids"] == expected.token_ids


def test_ping_and_custom_metrics(served):
    server, _, _ = served
    status, body = server.get(server.inference, "/ping")
    assert status == 200 and json.loads(body)["status"] == "Healthy"
    status, body = server.get(server.metrics, "/metrics", key=None)
    text = body.decode()
    assert status == 200
    for name in ("ClipcapBatchSize_count", "ClipcapTokensGenerated", "ClipcapPreprocessSeconds_sum",
                 "ClipcapEncodeSeconds_sum", "ClipcapDecodeSeconds_sum"):
        assert _metric(text, name) > 0, f"{name} missing from the metrics endpoint"
    # Batch sizes in power-of-two buckets: one counter per bucket, as many batches as the histogram counts.
    batches = [line for line in text.splitlines() if line.startswith(("ClipcapBatches{", "ClipcapBatches_total{"))]
    assert any('BatchSizeUpTo="1"' in line for line in batches), text[-3000:]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in batches) == _metric(text, "ClipcapBatchSize_count")


def test_token_authorization(served):
    server, _, images = served
    image = next(iter(images.values()))
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
    for key_header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {server.key('management')}"}):
        status, body = server.predict(image, {"Content-Type": "image/png", **key_header}, key=None)
        assert status == 400 and body["type"] == "InvalidKeyException", body
    assert server.get(server.inference, "/ping", key=None)[0] == 400
    assert server.get(server.management, "/models", key=None)[0] == 400
    assert server.get(server.management, "/models", key="inference")[0] == 400
    status, body = server.get(server.management, "/models", key="management")
    assert status == 200 and json.loads(body)["models"][0]["modelName"] == server.model


def test_the_shared_table_and_the_worker_keeps_serving(served):
    """tests/serving_cases.py, the table Ray Serve answers too (tests/test_serving_ray.py): every good form
    captions like the library, every bad one gets its status and message, and a good request after each."""
    server, bundle, images = served
    good = next(iter(images.values()))
    captioner = Captioner.from_path(bundle)
    with_options = captioner.default_options().replace(strategy="beam", beam_size=3, max_tokens=12)
    expected = {"": captioner.caption_images([decode_image(good)]).captions[0].token_ids,
                "options": captioner.caption_images([decode_image(good)], with_options).captions[0].token_ids}
    assert OPTIONS == {"decoding": "beam", "beam_size": 3, "max_tokens": 12}  # what with_options asks
    for case in cases(good):
        status, data = server.request(server.inference, case.method, case.path, case.body, case.headers)
        expected_status, fragment = case.expected("torchserve")
        assert status == expected_status, f"{case.name}: {status} {data[:300]}"
        if status == 200:
            assert json.loads(data)["token_ids"] == expected[case.fragment], case.name
            continue
        assert fragment in message(data), f"{case.name}: {data[:300]}"
        assert server.predict(good, {"Content-Type": "image/png"})[0] == 200, f"worker broken after: {case.name}"
    # Over max_request_size (16 MiB) TorchServe itself refuses, from the headers: a client that sends
    # "Expect: 100-continue" (curl does for large bodies) gets the 413 before uploading the body.
    connection = http.client.HTTPConnection("127.0.0.1", server.inference, timeout=30)
    connection.putrequest("POST", f"/predictions/{server.model}")
    for header, value in (("Content-Type", "image/png"), ("Content-Length", str(17 * 2**20)),
                          ("Expect", "100-continue"), ("Authorization", f"Bearer {server.key('inference')}")):
        connection.putheader(header, value)
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    assert server.predict(good, {"Content-Type": "image/png"})[0] == 200


async def _load(server, bodies: list[tuple[bytes, str]], clients: int, total: int) -> list[tuple[int, int]]:
    """`total` requests from `clients` concurrent clients -> (request index, status) per request."""
    import aiohttp

    url = f"http://127.0.0.1:{server.inference}/predictions/{server.model}"
    results, next_index = [], iter(range(total))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.key('inference')}"}) as session:
        async def client():
            for index in next_index:
                data, content_type = bodies[index % len(bodies)]
                async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
                    await response.read()
                    results.append((index, response.status))

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=600)  # a hang guard
    return results


def test_bad_and_good_requests_in_the_same_batches(served):
    server, _, images = served
    good = list(images.values())[0]
    bodies = [(good, "image/png"), (b"junk", "image/png")]
    results = asyncio.run(_load(server, bodies, clients=8, total=48))
    assert sorted(status for index, status in results if index % 2 == 0) == [200] * 24
    assert sorted(status for index, status in results if index % 2 == 1) == [400] * 24


def _strip_png() -> bytes:
    """An extreme strip, 1,000,000x6 (resized whole for the crop it needed a 37,333,333x224 intermediate)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1_000_000, 6), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _blocked_batch(server, blocker: tuple[bytes, str], bodies: list[tuple[bytes, str]]) -> list[tuple[int, dict]]:
    """Send `blocker`, then `bodies` concurrently while the worker is busy with it. Returns (status, body) per body."""
    import aiohttp

    url = f"http://127.0.0.1:{server.inference}/predictions/{server.model}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.key('inference')}"}) as session:
        async def post(data: bytes, content_type: str) -> tuple[int, dict]:
            async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
                raw = await response.read()
                try:
                    return response.status, json.loads(raw or b"{}")
                except ValueError:  # not one of our answers: keep it for the assertion message
                    return response.status, {"raw": raw[:300]}

        first = asyncio.ensure_future(post(*blocker))
        await asyncio.sleep(0.1)  # the blocker leaves the queue alone (maxBatchDelay is 5 ms)
        replies = await asyncio.wait_for(asyncio.gather(*(post(*body) for body in bodies)), timeout=150)
        assert (await first)[0] == 200
    return replies


def test_one_poison_among_seven_valid_requests(served):
    """Each poison kind sent together with seven valid requests while the worker is busy: the seven get 200 and
    the library's captions (they decode together in the worker's engine), the poison its own answer, and the
    worker lives on."""
    server, bundle, images = served
    valid = [list(images.values())[i % len(images)] for i in range(7)]
    captioner = Captioner.from_path(bundle)
    expected = [captioner.caption_images([decode_image(data)]).captions[0].token_ids for data in valid]
    b64 = base64.b64encode(valid[0]).decode()
    strip = _strip_png()
    poisons = [
        ("corrupt image", valid[0][: len(valid[0]) // 2], "image/png", 400),
        ("bad options", json.dumps({"image": b64, "beam_size": 1000}).encode(), "application/json", 400),
        ("wrong content type", b"hello", "text/plain", 415),
        # A hostile client's probe: replies that echoed these overflowed max_response_size and killed the worker.
        ("7 MB decoding string", json.dumps({"image": b64, "decoding": "A" * 7_000_000}).encode(), "application/json",
         413),
        ("max_tokens list of 1e6 ints", json.dumps({"image": b64, "max_tokens": list(range(1_000_000))}).encode(),
         "application/json", 400),
        ("deep nesting", b"[" * 100_000, "application/json", 400),
        # Not a poison any more: an extreme strip gets the caption of its centre square, not a 500 for all.
        ("extreme strip", strip, "image/png", 200),
    ]
    # The blocker keeps the worker busy while the eight arrive: decoding a 6000x6000 PNG (legal: at the pixel
    # limit, ~120 KB) takes ~0.6 s on an idle core.
    blocker = (png_bytes(Image.new("RGB", (6000, 6000), (200, 30, 30))), "image/png")
    worker = _worker_pids(server)
    for name, poison, content_type, status in poisons:
        bodies = [(data, "image/png") for data in valid[:3]] + [(poison, content_type)] + \
                 [(data, "image/png") for data in valid[3:]]
        replies = asyncio.run(_blocked_batch(server, blocker, bodies))
        poison_reply = replies.pop(3)
        assert [s for s, _ in replies] == [200] * 7, f"{name}: {replies}"
        assert [body["token_ids"] for _, body in replies] == expected, name
        assert poison_reply[0] == status, f"{name}: {poison_reply}"
        assert len(json.dumps(poison_reply[1])) < 1000, f"{name}: a long reply"  # quotes a short prefix at most
        if status == 200:
            assert poison_reply[1]["token_ids"] == captioner.caption_images([decode_image(strip)]).captions[0].token_ids
    assert _worker_pids(server) == worker, "the worker restarted: a request took it down"


def _worker_pids(server) -> list[int]:
    status, body = server.get(server.management, f"/models/{server.model}", key="management")
    assert status == 200
    return sorted(int(w["pid"]) for w in json.loads(body)[0]["workers"] if w["status"] == "READY")


def test_concurrent_load_zero_failures_and_batching(served):
    server, _, images = served
    before = server.get(server.metrics, "/metrics", key=None)[1].decode()
    bodies = [(data, "image/png") for data in images.values()]
    start = time.perf_counter()
    results = asyncio.run(_load(server, bodies, clients=8, total=504))
    seconds = time.perf_counter() - start
    after = server.get(server.metrics, "/metrics", key=None)[1].decode()
    assert len(results) == 504 and all(status == 200 for _, status in results)
    batches = _metric(after, "ClipcapBatchSize_count") - _metric(before, "ClipcapBatchSize_count")
    shared = _shared_batches(after) - _shared_batches(before)
    print(f"\n504 requests, 8 clients: {504 / seconds:.0f} req/s, {batches:.0f} batches, "
          f"{shared:.0f} of them with more than one request")
    assert shared > 0, "no batch held more than one request"


def _metric(text: str, prefix: str, contains: str = "") -> float:
    """Sum of the Prometheus samples whose line starts with `prefix` (and contains `contains`)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


def _shared_batches(text: str) -> float:
    """Batches of more than one request: all batches minus those in the histogram's le=1 bucket."""
    return _metric(text, "ClipcapBatchSize_count") - _metric(text, "ClipcapBatchSize_bucket{", 'le="1.0"')


def _form(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, dict]:
    """multipart/form-data from (name, value, filename or None for a text field)."""
    boundary = "clipcap-e2e"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
                    + (f'; filename="{filename}"\r\nContent-Type: image/png'.encode() if filename else b"")
                    + b"\r\n\r\n" + value + b"\r\n" for name, value, filename in parts)
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_request_forms_query_strings_and_request_ids(served):
    """Repeated parts, fields and JSON keys are 400s, unknown fields are unknown options; query strings
    are fields where TorchServe passes them on; the client's X-Request-ID comes back and is logged."""
    server, bundle, images = served
    data = next(iter(images.values()))
    captioner = Captioner.from_path(bundle)
    beam = captioner.caption_images([decode_image(data)], captioner.default_options().replace(
        strategy="beam", beam_size=3)).captions[0].token_ids
    b64 = base64.b64encode(data).decode()
    refused = [
        ("two file parts", *_form([("data", data, "a.png"), ("data", data, "b.png")]), "sent more than once"),
        ("repeated field", *_form([("data", data, "a.png"), ("decoding", b"beam", None), ("decoding", b"greedy", None)]),
         "sent more than once"),
        ("unknown field", *_form([("data", data, "a.png"), ("note", b"hi", None)]), "unknown option(s) 'note'"),
        ("repeated JSON key", f'{{"image": "{b64}", "decoding": "beam", "decoding": "greedy"}}'.encode(),
         {"Content-Type": "application/json"}, "given more than once"),
    ]
    for name, body, headers, fragment in refused:
        status, reply = server.predict(body, headers)
        assert status == 400 and fragment in reply["message"], f"{name}: {status} {reply}"
    # /invocations (and /{model}/predict) pass the query string on: honoured like form fields.
    for path in (f"/invocations?model_name={server.model}&decoding=beam&beam_size=3",
                 f"/{server.model}/predict?decoding=beam&beam_size=3"):
        status, raw = server.request(server.inference, "POST", path, data, {"Content-Type": "image/png"})
        assert status == 200 and json.loads(raw)["token_ids"] == beam, path
    status, raw = server.request(server.inference, "POST", f"/{server.model}/predict?decoding=nope", data,
                                 {"Content-Type": "image/png"})
    assert status == 400 and "decoding must be one of" in json.loads(raw)["message"]
    # The handler's log line about a request names TorchServe's id (the reply's X-Request-ID) and the client's.
    connection = http.client.HTTPConnection("127.0.0.1", server.inference, timeout=60)
    connection.request("POST", f"/predictions/{server.model}", body=b"junk", headers={
        "Content-Type": "image/png", "X-Request-ID": "e2e-refused-17", "Authorization": f"Bearer {server.key('inference')}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    line = f"request {response.getheader('X-Request-ID')} (X-Request-ID 'e2e-refused-17') refused: 400"
    assert response.status == 400
    model_log = server.root / "logs" / "model_log.log"
    deadline = time.monotonic() + 30  # the frontend writes the worker's output asynchronously
    while line not in model_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"not in model_log.log: {line}"
        time.sleep(0.2)


def test_float_edges_through_torchserve(served):
    """A few of a hostile client's numeric edges through the real server: the greedy limit, or a 400."""
    server, bundle, images = served
    data = next(iter(images.values()))
    b64 = base64.b64encode(data).decode()
    greedy = server.predict(data, {"Content-Type": "image/png"})[1]["token_ids"]
    for strategy in ("nucleus", "beam"):
        for temperature in ("1e-38", "5e-324"):
            body = f'{{"image": "{b64}", "decoding": "{strategy}", "temperature": {temperature}}}'.encode()
            status, reply = server.predict(body, {"Content-Type": "application/json"})
            assert status == 200 and reply["token_ids"] == greedy, (strategy, temperature, reply)
        for temperature in ("NaN", "Infinity", "-1e-38", "1e309", '"0.5"'):
            body = f'{{"image": "{b64}", "decoding": "{strategy}", "temperature": {temperature}}}'.encode()
            status, reply = server.predict(body, {"Content-Type": "application/json"})
            assert status == 400 and "temperature must be" in reply["message"], (strategy, temperature, reply)


PER_REQUEST_LINES = ("Backend received inference at:", "self._entry_point=")


def test_operations_config_heap_and_logs(served):
    """config.properties' vmargs reach Java (bounded heap, serving/log4j2.xml): rotated logs, no line twice."""
    server, _, _ = served
    java = server.processes[0].cmdline()
    assert {"-Xmx1g", "-XX:MaxDirectMemorySize=1g"} <= set(java)
    assert f"-Dlog4j.configurationFile={ROOT / 'serving' / 'log4j2.xml'}" in java
    for log in ("ts_log.log", "model_log.log", "access_log.log"):
        lines = (server.root / "logs" / log).read_text(errors="replace").splitlines()
        assert lines, f"{log} is empty"
        # TorchServe's async worker prints these per request: two requests in one millisecond repeat them.
        lines = [line for line in lines if not any(per_request in line for per_request in PER_REQUEST_LINES)]
        twice = [a for a, b in zip(lines, lines[1:]) if a == b]
        assert not twice, f"{log} writes lines twice: {twice[:3]}"


def _healthcheck(server, timeout_s: float) -> int:
    return subprocess.run([sys.executable, str(ROOT / "serving" / "healthcheck.py"), "--url",
                           f"http://127.0.0.1:{server.inference}", "--model", server.model, "--timeout", str(timeout_s),
                           "--key-file", str(server.root / "key_file.json")], capture_output=True, timeout=120).returncode


def test_healthcheck_fails_while_no_worker_can_caption(served):
    """/ping says Healthy with the worker hung (SIGSTOP) or dead (SIGKILL); serving/healthcheck.py, a real
    caption within a deadline, fails while the worker is stopped and passes again once a worker captions."""
    import signal

    import psutil

    server, _, _ = served
    assert _healthcheck(server, 30) == 0
    (worker,) = _worker_pids(server)
    os.kill(worker, signal.SIGSTOP)
    try:
        assert server.get(server.inference, "/ping")[0] == 200  # the frontend's answer: it cannot tell
        assert _worker_pids(server) == [worker]  # ... nor can the management API: the stopped worker is READY
        assert _healthcheck(server, 2) == 1
    finally:
        os.kill(worker, signal.SIGCONT)
    assert _healthcheck(server, 30) == 0
    os.kill(worker, signal.SIGKILL)
    assert server.get(server.inference, "/ping")[0] == 200
    deadline = time.monotonic() + START_TIMEOUT_S  # TorchServe starts a new worker: the check passes through it
    while _healthcheck(server, 5) != 0:
        assert time.monotonic() < deadline, "no worker captioned after the kill"
    while not _worker_pids(server):  # it captioned; the management API may list it READY a moment later
        assert time.monotonic() < deadline, "the worker that captioned is not listed READY"
        time.sleep(0.5)
    (replacement,) = _worker_pids(server)
    assert replacement != worker
    server.processes.append(psutil.Process(replacement))  # stopped and checked with the others


def test_a_second_server_beside_the_first_and_a_wrong_handler_section_fails_loudly(served, tmp_path):
    """A second TorchServe from a copy of config.properties with its own ports (all five, as the shipped
    file sets them) and TMPDIR starts and answers while the first serves. Its archive's handler: section is
    wrong (packed around build_mar.py's check): the handler's first line names the problem, on stderr
    (model_log.log's WARN: TorchServe logs a worker's stdout at INFO), and the health check fails, while
    /ping says 200."""
    import zipfile

    import psutil
    import yaml

    server, bundle, images = served
    mar = build_archive(ArchiveConfig(bundle=bundle, handler=ROOT / "serving" / "handler.py",
                                      model_config=ROOT / "serving" / "model-config.yaml",
                                      out=tmp_path / "good" / "clipcap.mar"))
    (tmp_path / "model_store").mkdir()
    with zipfile.ZipFile(mar) as good, zipfile.ZipFile(tmp_path / "model_store" / "clipcap.mar", "w") as bad:
        for item in good.infolist():
            data = good.read(item)
            if item.filename == "model-config.yaml":
                settings = yaml.safe_load(data)
                settings["handler"]["backend"] = "nope"
                data = yaml.safe_dump(settings).encode()
            bad.writestr(item, data)
    second = TorchServe(tmp_path, tmp_path / "model_store" / "clipcap.mar")
    try:
        second.start(wait_for_worker=False)
        model_log = tmp_path / "logs" / "model_log.log"
        deadline = time.monotonic() + START_TIMEOUT_S
        while "clipcap cannot start" not in (model_log.read_text(errors="replace") if model_log.exists() else ""):
            assert second.processes[0].is_running(), f"the second TorchServe exited:\n{second.log_tail()}"
            assert time.monotonic() < deadline, f"no start failure logged:\n{second.log_tail()}"
            time.sleep(1)
        assert second.get(second.inference, "/ping")[0] == 200
        reason = next(line for line in model_log.read_text(errors="replace").splitlines()
                      if "clipcap cannot start" in line)
        assert "[WARN ]" in reason and "-stderr MODEL_LOG - ERROR clipcap cannot start: model-config.yaml: " \
            "handler.backend 'nope' is not a backend" in reason
        assert _healthcheck(second, 5) == 1
        status, body = server.predict(next(iter(images.values())), {"Content-Type": "image/png"})
        assert status == 200 and body["token_ids"]  # the first server serves throughout
        second.processes += second.processes[0].children(recursive=True)
    finally:
        assert second.stop() == []
    time.sleep(2)  # a worker TorchServe was restarting when it stopped exits with it
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_stop_leaves_no_process_behind(served):
    import psutil

    server, _, _ = served
    tracked = list(server.processes)
    assert len(tracked) >= 2, "expected the Java frontend and at least one Python worker"
    assert server.stop() == [], "processes still alive a minute after torchserve --stop"
    assert not any(p.is_running() for p in tracked)
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if str(server.root) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
