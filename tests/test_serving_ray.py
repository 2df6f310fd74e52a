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
import json
import stat
import sys
import time
from pathlib import Path

import pytest

from clipcap import cli
from clipcap.bench.torchserve import free_ports
from serving_cases import OPTIONS, cases

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve-ray]')")

from clipcap.serving_ray import RayServeConfig, RayServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLE, SAMPLES = ROOT / "models" / "shapes-demo", ROOT / "samples"
MAX_ONGOING = 64  # per replica: 8 x batchSize (serving/model-config.yaml), so at most this many die with one

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (BUNDLE / "clipcap.json").exists(), reason="no demo bundle")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("serve-ray") / "token"
    port, metrics_port = free_ports(2)
    config = RayServeConfig(bundle=str(BUNDLE), model_config=str(ROOT / "serving" / "model-config.yaml"),
                            port=port, metrics_port=metrics_port, replicas=2, cpus_per_replica=0.5, token_file=str(token_file))
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


def test_the_shared_table(server, samples):
    good = samples[0].read_bytes()
    [plain] = _cli_captions(str(samples[0]))
    [beam] = _cli_captions("--decoding", "beam", "--beam-size", "3", "--max-tokens", "12", str(samples[0]))
    assert OPTIONS == {"decoding": "beam", "beam_size": 3, "max_tokens": 12}  # what the command line above asks
    for case in cases(good):
        status, body, _ = _request(server, case.method, "/predictions/clipcap", case.body, case.headers)
        reply = json.loads(body)
        assert status == case.status, f"{case.name}: {status} {reply}"
        if status == 200:
            expected = beam if case.fragment == "options" else plain
            assert reply["token_ids"] == expected["token_ids"], case.name
        else:
            assert case.fragment in reply["message"], f"{case.name}: {reply}"
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
