"""End to end: `clipcap serve-ray` on an embedded local Ray with two replicas, token on, on a free port.

One module-scoped server serves every test: the shared request table (tests/serving_cases.py, also
run against TorchServe), captions equal to `clipcap caption`'s, the v2 protocol with raw JSON and
with tritonclient.http, requests spread over both replicas, and last a replica killed under load:
it is replaced, every request gets an answer, and only those in flight on it fail (counted).
"""
import asyncio
import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from clipcap import cli
from clipcap_bench.torchserve import free_ports
from serving_cases import OPTIONS, cases, message

# Before Ray is imported (RayServer sets it too, but this module imports Ray first): the embedded Ray keeps
# 127.0.0.1 as its node address instead of swapping in the host's (clipcap.serving.ray_serve.EMBEDDED_RAY_ENV).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve-ray]')")

from clipcap.serving.ray_serve import RayServeConfig, RayServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLE, SAMPLES = ROOT / "models" / "shapes-demo", ROOT / "samples"
MAX_ONGOING = 64  # per replica: 8 x batchSize (serving/model-config.yaml), so at most this many die with one
BODY_TIMEOUT_S = 10  # the server's body deadline here: far above any body of these tests, short for the slow one

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (BUNDLE / "clipcap.json").exists(), reason="no demo bundle")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("serve-ray") / "token"
    port, metrics_port = free_ports(2)
    config = RayServeConfig(bundle=str(BUNDLE), model_config=str(ROOT / "serving" / "model-config.yaml"),
                            port=port, metrics=True, metrics_port=metrics_port, replicas=2, cpus_per_replica=0.5,
                            token_file=str(token_file), body_timeout_s=BODY_TIMEOUT_S)
    with RayServer(config) as running:
        yield running


def _request(server, method, path, body=None, headers=None, token=True) -> tuple[int, bytes, dict]:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {server.token}"
    connection = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def _cli_captions(*args: str) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["caption", str(BUNDLE), "--json", *args]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def samples():
    return sorted(SAMPLES.glob("*.png"))


def test_token_file_and_captions_equal_the_cli(server, samples):
    token_file = Path(server.config.token_file)
    assert token_file.read_text().strip() == server.token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    expected = _cli_captions(*map(str, samples))
    for path, cli_result in zip(samples, expected):
        status, body, _ = _request(server, "POST", "/predictions/clipcap", path.read_bytes(), {"Content-Type": "image/png"})
        reply = json.loads(body)
        assert status == 200, reply
        assert (reply["caption"], reply["token_ids"]) == (cli_result["caption"], cli_result["token_ids"]), path.name


def test_openai_client_streamed_and_not(server, samples):
    """OpenAI's chat completions on serve-ray with the real client: the CLI's caption, whole and streamed."""
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[dev]')")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.port}/v1", api_key=server.token)
    path = samples[0]
    expected = _cli_captions(str(path))[0]
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    completion = client.chat.completions.create(model="clipcap", messages=messages)
    assert completion.choices[0].message.content == expected["caption"]
    assert completion.usage.completion_tokens == len(expected["token_ids"])
    chunks = list(client.chat.completions.create(model="clipcap", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == expected["caption"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_shared_table(server, samples):
    good = samples[0].read_bytes()
    [plain] = _cli_captions(str(samples[0]))
    [beam] = _cli_captions("--decoding", "beam", "--beam-size", "3", "--max-tokens", "12", str(samples[0]))
    assert OPTIONS == {"decoding": "beam", "beam_size": 3, "max_tokens": 12}  # what the command line above asks
    for case in cases(good):
        status, body, _ = _request(server, case.method, case.path, case.body, case.headers)
        expected_status, fragment = case.expected("ray")
        assert status == expected_status, f"{case.name}: {status} {body[:300]}"
        if status == 200:
            expected = beam if case.fragment == "options" else plain
            assert json.loads(body)["token_ids"] == expected["token_ids"], case.name
        else:
            assert fragment in message(body), f"{case.name}: {body[:300]}"
            assert _request(server, "POST", "/predictions/clipcap", good)[0] == 200, f"replica broken after {case.name}"
    # Over max_request_bytes (16 MiB, as TorchServe's max_request_size) the front refuses from the headers:
    # a client that sends "Expect: 100-continue" gets the 413 before uploading the body.
    connection = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=30)
    connection.putrequest("POST", "/predictions/clipcap")
    for header, value in (("Content-Type", "image/png"), ("Content-Length", str(17 * 2**20)),
                          ("Expect", "100-continue"), ("Authorization", f"Bearer {server.token}")):
        connection.putheader(header, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "over the limit of 16777216" in json.loads(response.read())["message"]
    connection.close()


def _raw(server, head: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.config.port), timeout=60)
    connection.sendall(head)
    return connection


def _read_answer(connection: socket.socket) -> tuple[bytes, bytes]:
    """(status line, body) of the first answer on the connection, 1xx included."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += connection.recv(65536)
    return lines[0], body


def test_every_listening_socket_is_loopback_but_each_replicas_internal_grpc(server):
    """The embedded Ray and Ray Serve (GCS, raylet, object manager, workers, agents, metrics, the HTTP proxy):
    every listening socket of this process and of every process under it is on 127.0.0.1, but one per
    replica: Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] with no option to
    change it (ray/serve/_private/replica.py, `_on_initialized`; serving/README.md says so)."""
    import psutil

    listening = []
    for process in [psutil.Process()] + psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
    print(f"\n{len(listening)} listening sockets: {sorted(listening)}")
    ports = {port for _, _, port in listening}
    assert {server.config.port, server.config.metrics_port} <= ports
    exposed = []
    for name, address, port in listening:
        ip = ipaddress.ip_address(address)
        ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if not ip.is_loopback:
            exposed.append((name, address))
    assert sorted(exposed) == [("ray::ServeReplica:clipcap:CaptionReplica", "::")] * server.config.replicas, exposed


def test_over_the_limit_is_413_before_100_continue_and_a_head_over_16_kib_is_431(server):
    """The proxy answers from the head (clipcap.serving.http_limits): a client that sends Expect: 100-continue with a
    Content-Length over 16 MiB gets the 413, never "100 Continue", and sends no body byte; a 20 KiB head: 431."""
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    connection = _raw(server, b"POST /predictions/clipcap HTTP/1.1\r\nHost: x\r\n" + auth +
                      f"Content-Type: image/png\r\nContent-Length: {17 * 2**20}\r\nExpect: 100-continue\r\n\r\n".encode())
    status, body = _read_answer(connection)
    connection.close()
    assert status.startswith(b"HTTP/1.1 413") and "over the limit of 16777216" in json.loads(body)["message"], status
    connection = _raw(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n")
    status, body = _read_answer(connection)
    connection.close()
    assert status.startswith(b"HTTP/1.1 431") and "over the limit of 16384 bytes" in json.loads(body)["message"]
    assert _request(server, "GET", "/ping")[0] == 200


def test_a_body_sent_a_byte_at_a_time_gets_408_and_the_connection_closes(server):
    """A slow client holds a connection for the body deadline (BODY_TIMEOUT_S here), not forever."""
    connection = _raw(server, b"POST /predictions/clipcap HTTP/1.1\r\nHost: x\r\n" +
                      f"Authorization: Bearer {server.token}\r\nContent-Type: image/png\r\n"
                      f"Content-Length: 1000\r\n\r\n".encode())
    connection.settimeout(0.5)
    start, answer = time.monotonic(), b""
    while not answer and time.monotonic() - start < BODY_TIMEOUT_S + 60:
        connection.sendall(b"x")
        with contextlib.suppress(socket.timeout):
            answer = connection.recv(65536)
    connection.settimeout(30)
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    deadline = time.monotonic() + 30
    while (chunk := connection.recv(65536)) and time.monotonic() < deadline:  # the rest of the answer, then EOF
        answer += chunk
    assert chunk == b"", "the connection stayed open after the 408"
    assert b"did not arrive within" in answer
    connection.close()


def test_refusals_are_logged_with_their_request_ids(server):
    """Each refusal's status and reason in Ray Serve's log files (the replica's, the proxy's), never the token."""
    import ray

    bad_image = _request(server, "POST", "/predictions/clipcap", b"\0" * 10,
                         {"Content-Type": "image/png", "X-Request-ID": "log-probe-image"})
    wrong_token = _request(server, "POST", "/predictions/clipcap", b"\0" * 10,
                           {"Authorization": "Bearer wrong-token-7", "X-Request-ID": "log-probe-token"}, token=False)
    assert (bad_image[0], wrong_token[0]) == (400, 400)
    connection = _raw(server, b"POST /predictions/clipcap HTTP/1.1\r\nHost: x\r\nX-Request-ID: log-probe-size\r\n"
                      + f"Content-Length: {17 * 2**20}\r\n\r\n".encode())
    assert _read_answer(connection)[0].startswith(b"HTTP/1.1 413")
    connection.close()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    wanted = {"log-probe-image": "refused: 400 not a recognised image", "log-probe-token": "refused: 400 Token",
              "log-probe-size": "refused by the HTTP proxy: 413"}
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = "\n".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
        if all(any(key in line and fragment in line for line in text.splitlines()) for key, fragment in wanted.items()):
            break
        time.sleep(1)
    for key, fragment in wanted.items():
        assert any(key in line and fragment in line for line in text.splitlines()), (key, fragment)
    assert server.token not in text and "wrong-token-7" not in text


def test_token_refused_as_torchserve_refuses_it(server, samples):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body, _ = _request(server, "POST", "/predictions/clipcap", samples[0].read_bytes(), headers, token=False)
        assert status == 400 and json.loads(body)["type"] == "InvalidKeyException"
        assert _request(server, "GET", "/ping", headers=headers, token=False)[0] == 400
        assert _request(server, "GET", "/v2/models/clipcap", headers=headers, token=False)[0] == 401
    assert _request(server, "GET", "/v2/health/ready", token=False)[0] == 200
    assert json.loads(_request(server, "GET", "/ping")[1]) == {"status": "Healthy"}


def test_v2_raw_json_and_tritonclient(server, samples):
    import numpy as np

    datas = [path.read_bytes() for path in samples]
    expected = _cli_captions("--decoding", "beam", "--beam-size", "2", *map(str, samples))
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(datas)],
                           "data": [base64.b64encode(d).decode() for d in datas]}],
               "parameters": {"decoding": "beam", "beam_size": 2}}
    status, body, _ = _request(server, "POST", "/v2/models/clipcap/infer", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert status == 200 and outputs["caption"]["data"] == [e["caption"] for e in expected]

    triton = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the serve-ray extra)")
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.config.port}")
    auth = {"Authorization": f"Bearer {server.token}"}
    try:
        assert client.is_server_ready() and client.is_model_ready("clipcap", headers=auth)
        metadata = client.get_model_metadata("clipcap", headers=auth)
        assert [i["name"] for i in metadata["inputs"]] == ["image"]
        image = triton.InferInput("image", [len(datas)], "BYTES")
        image.set_data_from_numpy(np.array(datas, dtype=np.object_), binary_data=True)
        result = client.infer("clipcap", [image], headers=auth, parameters={"decoding": "beam", "beam_size": 2},
                              outputs=[triton.InferRequestedOutput("caption"), triton.InferRequestedOutput("token_ids")])
        assert [c.decode() for c in result.as_numpy("caption")] == [e["caption"] for e in expected]
        assert [[t for t in row if t >= 0] for row in result.as_numpy("token_ids").tolist()] == \
            [e["token_ids"] for e in expected]
        with pytest.raises(triton.InferenceServerException, match="unknown option"):
            client.infer("clipcap", [image], headers=auth, parameters={"url": "http://example.com"})
    finally:
        client.close()


async def _load(server, bodies: list[bytes], clients: int, total: int, on_answer=None) -> list[tuple[int, int, str, dict]]:
    """`total` raw-body requests from `clients` concurrent clients -> (index, status, replica, reply) each."""
    import aiohttp

    url = f"http://127.0.0.1:{server.config.port}/predictions/clipcap"
    results, indices = [], iter(range(total))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}, timeout=timeout) as session:
        async def client():
            for index in indices:
                try:
                    async with session.post(url, data=bodies[index % len(bodies)],
                                            headers={"Content-Type": "image/png"}) as response:
                        raw = await response.read()
                        status, replica = response.status, response.headers.get("x-clipcap-replica", "")
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:  # a connection dropped: counted
                    status, replica, raw = 0, "", repr(error).encode()
                try:
                    reply = json.loads(raw)
                except ValueError:
                    reply = {"raw": raw[:200].decode(errors="replace")}
                results.append((index, status, replica, reply))
                if on_answer is not None:
                    on_answer(results)

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=240)
    return results


def test_requests_spread_over_both_replicas(server, samples):
    bodies = [path.read_bytes() for path in samples]
    expected = [e["token_ids"] for e in _cli_captions(*map(str, samples))]
    results = asyncio.run(_load(server, bodies, clients=8, total=64))
    assert all(status == 200 for _, status, _, _ in results), [r for r in results if r[1] != 200][:3]
    assert all(reply["token_ids"] == expected[index % len(bodies)] for index, _, _, reply in results)
    per_replica = {}
    for _, _, replica, _ in results:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    print(f"\n64 requests over the replicas: {per_replica}")
    assert len(per_replica) == 2 and min(per_replica.values()) > 0


def _metric(text: str, prefix: str, contains: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


def test_handler_metrics_show_shared_batches(server):
    """The handler's metrics on Ray's Prometheus endpoint (lower-cased, ray_ prefix); after the load above,
    @serve.batch must have captioned some batches of more than one request."""
    import urllib.request

    url, deadline = f"http://127.0.0.1:{server.config.metrics_port}/metrics", time.monotonic() + 90
    batches = shared = 0
    while time.monotonic() < deadline and not shared:  # Ray exports every few seconds, batches in arrears
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        batches = _metric(text, "ray_clipcapbatchsize_count")
        shared = batches - _metric(text, "ray_clipcapbatchsize_bucket{", 'le="1.0"')
        time.sleep(0 if shared else 2)
    print(f"\n{batches:.0f} batches exported, {shared:.0f} of them with more than one request")
    assert shared > 0, "no batch of more than one request on Ray's metrics endpoint after 90 s"
    bounds = {line.split('le="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("ray_clipcapbatchsize_bucket{")}
    assert {"1.0", "2.0", "4.0", "8.0"} <= bounds and "0.005" not in bounds  # batch sizes, not seconds
    for name in ("ray_clipcaptokensgenerated_total", "ray_clipcappreprocessseconds_sum", "ray_clipcapencodeseconds_sum",
                 "ray_clipcapdecodeseconds_sum"):
        assert _metric(text, name) > 0, name


def test_a_replica_killed_under_load_is_replaced_and_costs_only_its_in_flight_requests(server, samples):
    import ray

    bodies = [path.read_bytes() for path in samples]
    expected = [e["token_ids"] for e in _cli_captions(*map(str, samples))]
    killed = {}

    def kill_after_twenty(results):
        if len(results) == 20 and not killed:
            replica = results[-1][2]
            actor = ray.get_actor(f"SERVE_REPLICA::clipcap#CaptionReplica#{replica}", namespace="serve")
            ray.kill(actor, no_restart=True)
            killed.update(replica=replica, at=len(results))

    total = 240
    results = asyncio.run(_load(server, bodies, clients=8, total=total, on_answer=kill_after_twenty))
    assert killed and len(results) == total  # every request answered, none lost
    failed = [(index, status, reply) for index, status, _, reply in results if status != 200]
    served = [(index, replica, reply) for index, status, replica, reply in results if status == 200]
    assert all(reply["token_ids"] == expected[index % len(bodies)] for index, _, reply in served), "a wrong answer"
    after = {replica for index, replica, _ in served if index >= killed["at"] + 8 * 2} - {killed["replica"]}
    print(f"\nkilled replica {killed['replica']} after {killed['at']} answers: {len(failed)} of {total} requests "
          f"failed ({sorted({s for _, s, _ in failed})}), answered after the kill by {sorted(after)}")
    # Only what was in flight on the killed replica may fail: at most its max_ongoing_requests, and only
    # requests sent before the kill (8 clients: the request indices in flight then are below at + 8).
    assert len(failed) <= MAX_ONGOING and all(index < killed["at"] + 8 for index, _, _ in failed), failed
    # The controller starts a replacement: wait until a replica other than the two first ones answers.
    first = {replica for _, replica, _ in served} | {killed["replica"]}
    deadline, replacement = time.monotonic() + 150, None
    while time.monotonic() < deadline and replacement is None:
        status, _, headers = _request(server, "POST", "/predictions/clipcap", bodies[0], {"Content-Type": "image/png"})
        assert status == 200
        replacement = headers["x-clipcap-replica"] if headers["x-clipcap-replica"] not in first else None
        time.sleep(0.2)
    assert replacement is not None, "no replacement replica answered within 150 s"
    print(f"replacement replica {replacement} answered", file=sys.stderr)
