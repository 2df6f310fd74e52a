"""OpenAI's chat completions API for clipcap: `POST /v1/chat/completions` and `GET /v1/models`.

A request captions exactly one image, given as an `image_url` content part whose URL is a `data:`
URL (`data:image/jpeg;base64,...`). A remote `http(s)` URL is refused with a 400 that says why: no
URL is ever fetched. Text parts and system messages are accepted and ignored (the model is
conditioned on the image alone). Sampling follows OpenAI's meaning: `temperature` 0 (or neither
`temperature` nor `top_p`) decodes greedily, any other `temperature` or `top_p` samples (nucleus),
`seed` makes it repeatable; `max_tokens` (or `max_completion_tokens`) caps the caption. clipcap's
own options (`decoding`, `beam_size`) are accepted as extra body fields. `stream: true` answers
with server-sent events, one `chat.completion.chunk` per settled token, ending in `data: [DONE]`.
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`. Image and option rules
(size, formats, bounds) are CaptionService's; this module only reads and writes the wire format.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from clipcap.quoting import quote

OWNER = "clipcap"
# clipcap options a body may carry beside OpenAI's (the JSON request form's keys).
EXTRA_OPTIONS = ("decoding", "beam_size")
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
                "stream", "stream_options", "user", *EXTRA_OPTIONS}


class ChatError(Exception):
    """A request refused in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    image: bytes  # the image part's bytes, from its data: URL
    options: dict  # decoding options in the JSON request form's keys, checked by CaptionService
    stream: bool = False  # answer with server-sent events
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def models(name: str) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": OWNER}]}


def parse_chat(body: bytes, model_name: str) -> ChatRequest:
    """A chat completions body -> ChatRequest, or ChatError (400, or 404 for another model's name)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise ChatError(400, "the body is not valid JSON") from None
    if not isinstance(request, dict):
        raise ChatError(400, "the body must be a JSON object")
    unknown = sorted(set(request) - KNOWN_FIELDS)
    if unknown:
        raise ChatError(400, f"unsupported field(s) {', '.join(quote(name) for name in unknown[:5])}", unknown[0])
    model = request.get("model")
    if model is not None and model != model_name:
        raise ChatError(404, f"the model {quote(model)} does not exist; this server serves {quote(model_name)}",
                        "model", "model_not_found")
    if request.get("n", 1) != 1:
        raise ChatError(400, "n must be 1: one caption per request", "n")
    image = _image(request.get("messages"))
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise ChatError(400, "stream must be true or false", "stream")
    stream_options = request.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise ChatError(400, 'stream_options may hold only "include_usage"', "stream_options")
    return ChatRequest(image, _options(request), stream, stream_options.get("include_usage") is True)


def _image(messages: Any) -> bytes:
    if not isinstance(messages, list) or not messages:
        raise ChatError(400, "messages must be a non-empty list", "messages")
    images = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatError(400, 'each message must be an object with a "role"', "messages")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ChatError(400, 'each content part must be an object with a "type"', "messages")
                if part["type"] == "image_url":
                    images.append(part.get("image_url"))
                elif part["type"] != "text":
                    raise ChatError(400, f"content part type {quote(part['type'])} is not supported; "
                                         "send one image_url part (text parts are ignored)", "messages")
        elif content is not None and not isinstance(content, str):
            raise ChatError(400, "message content must be a string or a list of parts", "messages")
    if len(images) != 1:
        raise ChatError(400, f"send exactly one image_url content part (got {len(images)}): one caption per image",
                        "messages")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str):
        raise ChatError(400, 'image_url needs "url": a data: URL of the image', "messages")
    if url.lower().startswith(("http://", "https://")):
        raise ChatError(400, "remote image URLs are not fetched (no server-side requests): send the image inline "
                             "as a data: URL, data:image/jpeg;base64,...", "messages", "remote_url_refused")
    header, comma, data = url.partition(",")
    if not (header.lower().startswith("data:") and header.lower().endswith(";base64") and comma):
        raise ChatError(400, "image_url must be a base64 data: URL, data:<media type>;base64,<data>", "messages")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatError(400, "the data: URL's base64 is not valid", "messages") from None


def _options(request: dict) -> dict:
    """OpenAI's sampling fields -> the JSON request form's decoding options. A field the chosen strategy
    does not use (a seed or temperature 0 with greedy decoding) is left out, as OpenAI's API ignores it."""
    options = {key: request[key] for key in EXTRA_OPTIONS if key in request}
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    temperature, top_p, seed = request.get("temperature"), request.get("top_p"), request.get("seed")
    if "decoding" not in options and ((temperature is not None and temperature != 0) or top_p not in (None, 1)):
        options["decoding"] = "nucleus"
    used = {"nucleus": ("temperature", "top_p", "seed"), "beam": ("temperature",)}.get(options.get("decoding"), ())
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if name in used and value is not None:
            options[name] = value
    return options


def completion(request: ChatRequest, model_name: str, caption: str, token_ids: list[int], finished: bool,
               prompt_tokens: int) -> dict:
    """The non-streamed answer. `finished`: the caption ended with a stop token (else it hit max_tokens)."""
    return {"id": request.id, "object": "chat.completion", "created": request.created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": caption},
                         "logprobs": None, "finish_reason": "stop" if finished else "length"}],
            "usage": usage(prompt_tokens, len(token_ids))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """`prompt_tokens`: the prefix embeddings the image becomes (the mapper's prefix_length)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(request: ChatRequest, model_name: str, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None) -> bytes:
    """One server-sent event holding a chat.completion.chunk."""
    body = {"id": request.id, "object": "chat.completion.chunk", "created": request.created, "model": model_name,
            "choices": [] if usage_counts is not None else
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return event(body)


def event(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n".encode()


DONE = event("[DONE]")
