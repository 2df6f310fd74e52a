"""OpenAI's chat completions on the HTTP front, spoken to by the real `openai` client and by `curl -N`.

The front (clipcap.serving.front) runs under uvicorn in this process, as Ray Serve runs it in a replica
(tests/test_serving_ray.py runs the same client against `clipcap serve-ray`).
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time

import pytest

from clipcap.captioner import Captioner
from clipcap.serving.config import ServingConfig
from clipcap.serving.front import CaptionFront, FrontConfig
from clipcap.serving.service import CaptionService
from clipcap_bench.torchserve import free_ports
from conftest import png_bytes, random_images
from test_engine import Gate

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (the serve-ray extra brings it)")

TOKEN = "test-token"


class Server:
    """A CaptionFront behind uvicorn on a free loopback port, in a thread."""

    def __init__(self, front: CaptionFront):
        from starlette.requests import Request
        from starlette.responses import Response, StreamingResponse

        async def app(scope, receive, send):
            request = Request(scope, receive)
            answer = await front.answer(request.method, request.url.path, request.url.query,
                                        dict(request.headers.items()), request.stream())
            response = Response(answer.body, answer.status, answer.headers) if isinstance(answer.body, bytes) else \
                StreamingResponse(answer.body, answer.status, answer.headers)
            await response(scope, receive, send)

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def captioner(tiny_bundle):
    return Captioner.from_path(tiny_bundle)


@pytest.fixture(scope="module")
def served(captioner):
    service = CaptionService(captioner, ServingConfig())
    with Server(CaptionFront(FrontConfig(token=TOKEN), service)) as server:
        yield server, service
    service.close()


def data_url(index: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(random_images(4, seed=9)[index])).decode()


def messages(index: int, url: str | None = None) -> list[dict]:
    return [{"role": "system", "content": "You caption images."},
            {"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": url or data_url(index)}}]}]


def library(captioner, index: int, **options):
    from clipcap.decoding import DecodingOptions

    image = random_images(4, seed=9)[index]
    return captioner.caption_images([image], DecodingOptions(**options)).captions[0]


def test_the_openai_client_gets_the_librarys_caption(served, captioner):
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN)
    assert [model.id for model in client.models.list()] == ["clipcap"]
    for index in range(2):
        completion = client.chat.completions.create(model="clipcap", messages=messages(index), max_tokens=12)
        expected = library(captioner, index, max_tokens=12)
        assert completion.choices[0].message.content == expected.caption
        assert completion.choices[0].finish_reason == ("stop" if expected.token_ids[-1] in
                                                       captioner.config.tokenizer.stop_token_ids else "length")
        assert completion.usage.completion_tokens == len(expected.token_ids)
        assert completion.usage.prompt_tokens == captioner.config.mapper.prefix_length


def test_seeded_sampling_through_the_client_is_the_librarys(served, captioner):
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN)
    completion = client.chat.completions.create(model="clipcap", messages=messages(2), temperature=1.3, top_p=0.9,
                                                seed=11)
    expected = library(captioner, 2, strategy="nucleus", temperature=1.3, top_p=0.9, seed=11)
    assert completion.choices[0].message.content == expected.caption


def test_streamed_chunks_make_the_caption(served, captioner):
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN)
    stream = client.chat.completions.create(model="clipcap", messages=messages(1), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = library(captioner, 1)
    assert text.strip() == expected.caption
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # more than one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_errors_reach_the_client_as_openai_errors(served):
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN)
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        client.chat.completions.create(model="clipcap", messages=messages(0, "https://example.com/cat.jpg"))
    with pytest.raises(openai.BadRequestError, match="not a recognised image"):
        client.chat.completions.create(model="clipcap", messages=messages(0, "data:image/png;base64,aGVsbG8="))
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages(0))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(served):
    server, _ = served
    body = json.dumps({"model": "clipcap", "messages": messages(3), "stream": True})
    out = subprocess.run(["curl", "-sN", f"{server.url}/v1/chat/completions", "-H", f"Authorization: Bearer {TOKEN}",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_a_client_that_goes_away_mid_stream_cancels_its_caption(captioner):
    """The stream's reader closes after the first chunk: the request's rows leave the decode at the next step."""
    from clipcap.serving.engine import CLIENT_GONE, CaptionFailed

    gate = Gate(captioner.runtime)
    service = CaptionService(Captioner(gate, captioner.tokenizer, captioner.config), ServingConfig())
    handles = []
    submit = service.submit
    service.submit = lambda request: handles.append(submit(request)) or handles[-1]
    try:
        with Server(CaptionFront(FrontConfig(token=None), service)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
            stream = client.chat.completions.create(model="clipcap", messages=messages(0), stream=True, max_tokens=20)
            next(iter(stream))  # the role chunk: the request is running
            gate.wait_entered(1)
            stream.close()  # the client goes away
            deadline = time.monotonic() + 30
            while not handles[0].cancelled:  # the server notices the closed connection; no step runs meanwhile
                assert time.monotonic() < deadline, "the request was not cancelled"
                time.sleep(0.05)
            gate.open_all()
            with pytest.raises(CaptionFailed) as failure:
                handles[0].result(30)
            assert failure.value.status == CLIENT_GONE
            assert len(gate.calls) <= 2  # its prefix step, and at most the one step under way
    finally:
        gate.open_all()
        service.close()
