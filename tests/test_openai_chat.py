"""The OpenAI chat completions wire format (clipcap.serving.openai_chat), without a server.

The real `openai` client against a running front is tested in tests/test_serving_front.py and
tests/test_serving_ray.py; here every field rule and refusal, over generated bodies too.
"""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.serving import openai_chat
from clipcap.serving.openai_chat import ChatError, parse_chat

IMAGE = b"\x89PNG\r\n\x1a\n fake bytes"
DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


def body(**fields) -> bytes:
    request = {"model": "clipcap", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": DATA_URL}}]}]}
    request.update(fields)
    return json.dumps(request).encode()


def test_a_data_url_image_and_the_text_ignored():
    request = parse_chat(body(), "clipcap")
    assert request.image == IMAGE and request.options == {} and not request.stream
    assert request.id.startswith("chatcmpl-")


@pytest.mark.parametrize("fields, options", [
    ({}, {}),
    ({"temperature": 0}, {}),
    ({"temperature": 0, "seed": 3}, {}),  # greedy: the seed has nothing to do
    ({"temperature": 0.7}, {"decoding": "nucleus", "temperature": 0.7}),
    ({"top_p": 0.5, "seed": 9}, {"decoding": "nucleus", "top_p": 0.5, "seed": 9}),
    ({"temperature": 1.2, "top_p": 0.9, "seed": 1}, {"decoding": "nucleus", "temperature": 1.2, "top_p": 0.9, "seed": 1}),
    ({"max_tokens": 12}, {"max_tokens": 12}),
    ({"max_completion_tokens": 5, "max_tokens": 12}, {"max_tokens": 5}),
    ({"decoding": "beam", "beam_size": 3, "temperature": 0.5, "seed": 2},
     {"decoding": "beam", "beam_size": 3, "temperature": 0.5}),
])
def test_sampling_fields_map_to_decoding_options(fields, options):
    assert parse_chat(body(**fields), "clipcap").options == options


def test_remote_urls_are_refused_and_never_fetched():
    for url in ("http://127.0.0.1/cat.jpg", "https://example.com/cat.jpg", "HTTPS://example.com/x"):
        request = json.loads(body())
        request["messages"][0]["content"][1]["image_url"]["url"] = url
        with pytest.raises(ChatError) as error:
            parse_chat(json.dumps(request).encode(), "clipcap")
        assert error.value.status == 400 and "not fetched" in error.value.message
        assert error.value.code == "remote_url_refused"


@pytest.mark.parametrize("raw, fragment, status", [
    (b"{", "not valid JSON", 400),
    (b"[]", "JSON object", 400),
    (body(model="gpt-4o"), "does not exist", 404),
    (body(n=2), "n must be 1", 400),
    (body(stream="yes"), "stream must be", 400),
    (body(stream_options={"other": 1}), "stream_options", 400),
    (body(tools=[]), "unsupported field", 400),
    (json.dumps({"messages": []}).encode(), "non-empty list", 400),
    (json.dumps({"messages": [{"role": "user", "content": "just text"}]}).encode(), "exactly one image_url", 400),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "image_url", "image_url": {"url": DATA_URL}}]}]}
     ).encode(), "exactly one image_url", 400),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}).encode(), "not supported", 400),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}]}]}).encode(), "base64 data: URL", 400),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}]}]}).encode(), "not valid", 400),
])
def test_bad_requests_are_refused_in_openai_error_shape(raw, fragment, status):
    with pytest.raises(ChatError) as error:
        parse_chat(raw, "clipcap")
    assert error.value.status == status and fragment in error.value.message
    shape = error.value.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["message"] == error.value.message


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                                       max_size=4), max_leaves=30))
def test_any_json_is_a_request_or_a_chat_error(value):
    """Whatever JSON arrives, the parser answers a ChatRequest or a ChatError: never another exception."""
    try:
        parse_chat(json.dumps(value).encode(), "clipcap")
    except ChatError as error:
        assert 400 <= error.status < 500 and len(error.message) < 400


def test_completion_chunks_and_usage():
    request = parse_chat(body(stream=True, stream_options={"include_usage": True}), "clipcap")
    assert request.stream and request.include_usage
    answer = openai_chat.completion(request, "clipcap", "a red circle", [5, 6, 0], True, prompt_tokens=4)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "a red circle"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    event = openai_chat.chunk(request, "clipcap", {"content": "a"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "a"}
    usage_event = json.loads(openai_chat.chunk(request, "clipcap", {}, usage_counts={"total_tokens": 1})[6:])
    assert usage_event["choices"] == [] and usage_event["usage"] == {"total_tokens": 1}
    assert openai_chat.DONE == b"data: [DONE]\n\n"
    assert openai_chat.models("clipcap")["data"][0]["id"] == "clipcap"
