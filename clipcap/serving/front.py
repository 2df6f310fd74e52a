"""The HTTP front of a caption server other than TorchServe: routes, bearer token, request size, and
two APIs over one caption function.

- TorchServe's inference API: `/predictions/<model>` with any method (TorchServe 0.12 hands a GET or
  DELETE to the handler too: "empty request"), and `POST /invocations` and `POST /<model>/predict`,
  whose query strings TorchServe passes on as fields (each request read into a clipcap.serving.form
  Form, as TorchServe's handler makes one of TorchServe's row, and answered by CaptionService with the
  same status and error JSON); `GET /ping`; a
  missing or wrong token answers what TorchServe 0.12 answers (400 InvalidKeyException). The request
  id is the X-Request-ID header (Ray Serve's proxy sets it: the client's own, else a new one),
  answered in X-Request-ID and named in the log lines: CaptionService's, and the front's own line for
  each request it refuses itself (status and reason; never a token or body bytes).
- The Open Inference Protocol (clipcap.serving.oip): `GET /v2/health/live|ready` (no token: for probes),
  `GET /v2`, `GET /v2/models/<model>[/ready]`, `POST /v2/models/<model>/infer`; its errors are
  `{"error": "..."}`, a missing or wrong token 401. Each image's bytes (raw in the binary extension)
  go to CaptionService.build as they are.
- OpenAI's chat completions (clipcap.serving.openai_chat): `POST /v1/chat/completions`, streamed as
  server-sent events with `"stream": true` (the answer's body is then an async iterator of events;
  the request is cancelled when the client goes away), and `GET /v1/models`; errors in OpenAI's shape.

Header names are read case-insensitively, and a header sent twice counts once, its last value (as
TorchServe's frontend reads them). A body is read within `body_timeout_s`, else 408 and the
connection closed. No web framework here: `CaptionFront.answer` takes the request's parts and
returns an `Answer`, so it is tested without a server; clipcap.serving.ray_serve adapts it to Ray Serve.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from clipcap.quoting import quote
from clipcap.serving import oip, openai_chat
from clipcap.serving.engine import CaptionFailed
from clipcap.serving.form import FormError, read_form
from clipcap.serving.service import CaptionService, Reply, ServingError

logger = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}
BAD_TOKEN = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"  # TorchServe's words

ReplyHook = Callable[[Reply], None]  # called with every request's reply (the replica's metrics)


@dataclass
class FrontConfig:
    model_name: str = "clipcap"  # /predictions/<model_name>, /v2/models/<model_name>
    token: str | None = None  # the bearer token every call but /v2/health needs; None: no token (--no-auth)
    max_request_bytes: int = 16 * 2**20  # whole HTTP body, as TorchServe's max_request_size in config.properties
    max_images_per_request: int = 16  # images in one v2 infer request (each is captioned as one request)
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408 (a slow client holds no slot)
    headers: dict[str, str] = field(default_factory=dict)  # added to every answer (the replica serving it)


@dataclass
class Answer:
    status: int  # HTTP status
    body: bytes | AsyncIterator[bytes]  # response body; an async iterator: streamed (server-sent events)
    headers: dict[str, str]  # response headers
    refusal: str = ""  # why the front itself refused the request (logged); "" otherwise


def _json(status: int, body: dict) -> Answer:
    return Answer(status, json.dumps(body).encode(), dict(JSON_HEADERS))


def _refused(status: int, body: dict, reason: str) -> Answer:
    answer = _json(status, body)
    answer.refusal = reason
    if status == 408:  # the body never came: the connection is not reused
        answer.headers["connection"] = "close"
    return answer


def _torchserve_error(status: int, kind: str, message: str) -> Answer:
    return _refused(status, {"code": status, "type": kind, "message": message}, message)


def _v2_error(status: int, message: str) -> Answer:
    return _refused(status, {"error": message}, message)


class CaptionFront:
    """Answers one HTTP request through the worker's CaptionService (its engine batches the requests)."""

    def __init__(self, config: FrontConfig, service: CaptionService, on_reply: ReplyHook | None = None):
        self.config = config
        self.service = service
        self.on_reply = on_reply

    async def answer(self, method: str, path: str, query: str, headers: dict[str, str],
                     body: AsyncIterator[bytes]) -> Answer:
        headers = {k.lower(): v for k, v in headers.items()}  # one value per name: the last one sent
        request_id = headers.pop("x-request-id", "") or uuid.uuid4().hex  # the id itself, not the client's header
        answer = await self._route(method, path.rstrip("/") or "/", query, headers, body, request_id)
        if answer.refusal:
            logger.info("request %s refused: %d %s (%s %s)", request_id, answer.status, answer.refusal, method,
                        quote(path, 64))
        answer.headers.update({**self.config.headers, "x-request-id": request_id})
        return answer

    async def _route(self, method: str, path: str, query: str, headers: dict, body: AsyncIterator[bytes],
                     request_id: str) -> Answer:
        name = self.config.model_name
        if path.startswith("/v1/"):
            return await self._openai(method, path, headers, body, request_id)
        if path in ("/v2/health/live", "/v2/health/ready"):
            return _json(200, {path.rsplit("/", 1)[1]: True})
        if path.startswith("/v2"):
            if not self._authorized(headers):
                return _v2_error(401, BAD_TOKEN)
            if path == "/v2" and method == "GET":
                return _json(200, {"name": name, "version": "2", "extensions": ["binary_tensor_data"]})
            if path == f"/v2/models/{name}" and method == "GET":
                return _json(200, oip.model_metadata(name))
            if path == f"/v2/models/{name}/ready" and method == "GET":
                return _json(200, {"name": name, "ready": True})
            if path == f"/v2/models/{name}/infer" and method == "POST":
                return await self._infer(headers, body, request_id)
            return _v2_error(404, f"v2 endpoint not found: {quote(method)} {quote(path)}")
        if not self._authorized(headers):
            return _torchserve_error(400, "InvalidKeyException", BAD_TOKEN)
        if path == "/ping" and method == "GET":
            return _json(200, {"status": "Healthy"})
        if path == f"/predictions/{name}":
            return await self._predict("", headers, body, request_id)  # TorchServe drops this route's query string
        if (path == "/invocations" or path == f"/{name}/predict") and method == "POST":
            routed = dict(parse_qsl(query, keep_blank_values=True)).get("model_name", name)
            if path == "/invocations" and routed != name:  # TorchServe routes /invocations by this parameter
                return _torchserve_error(404, "ModelNotFoundException", f"Model not found: {quote(routed)}")
            return await self._predict(query, headers, body, request_id)
        if path.startswith("/predictions/"):
            return _torchserve_error(404, "ModelNotFoundException", f"Model not found: {quote(path[13:])}")
        return _torchserve_error(404, "ResourceNotFoundException",
                                 "Requested resource is not found, please refer to API document.")

    def _authorized(self, headers: dict) -> bool:
        if self.config.token is None:
            return True
        return hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.config.token}".encode())

    async def _read(self, headers: dict, body: AsyncIterator[bytes]) -> bytes:
        """The whole body, refused (413) from Content-Length before it is read or as soon as it is over;
        408 when it has not all arrived within body_timeout_s."""
        limit = self.config.max_request_bytes
        declared = headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise ServingError(413, f"request body of {quote(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        raise ServingError(413, f"request body is over the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise ServingError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s "
                                    f"({size} bytes came)") from None
        return b"".join(chunks)

    async def _caption(self, request, request_id: str) -> Reply:
        """A parsed request's reply (a refusal's too), recorded by `on_reply`."""
        try:
            reply = await self.service.caption(request)
        except Exception:  # the engine or the replica failed: this request's 500, never the server's end
            logger.exception("request %s: captioning failed outside CaptionService", request_id)
            reply = ServingError(500, "internal error while captioning (logged on the server)").reply()
        self._record(reply)
        return reply

    async def _predict(self, query: str, headers: dict, body: AsyncIterator[bytes], request_id: str) -> Answer:
        try:
            data = await self._read(headers, body)
            form = await asyncio.to_thread(read_form, headers, data, query)  # multipart: CPU work
        except (ServingError, FormError) as error:
            refusal = error if isinstance(error, ServingError) else ServingError(400, str(error))
            return _refused(refusal.status, refusal.reply().body, refusal.message)
        request = await self.service.parse_async(form, request_id)
        reply = await self._caption(request, request_id)
        return Answer(reply.status, json.dumps(reply.body).encode(), {**JSON_HEADERS, **reply.headers})

    async def _infer(self, headers: dict, body: AsyncIterator[bytes], request_id: str) -> Answer:
        try:
            data = await self._read(headers, body)
            request = oip.parse_infer(data, headers.get(oip.HEADER_LENGTH.lower()), self.config.max_images_per_request)
        except (ServingError, oip.ProtocolError) as error:
            return _v2_error(error.status, error.message)
        parsed = await asyncio.gather(*(self.service.build_async(image, _image_options(request.options, index),
                                                                 f"{request_id}/{index}")
                                        for index, image in enumerate(request.images)))
        replies = await asyncio.gather(*(self._caption(one, f"{request_id}/{index}") for index, one in enumerate(parsed)))
        for index, reply in enumerate(replies):
            if reply.status != 200:  # the request fails as a whole; the first failing image says why
                return _json(reply.status, {"error": f"image {index} of {len(replies)}: {reply.body['message']}"})
        body, response_headers = oip.infer_response(self.config.model_name, request,
                                                    [r.body["caption"] for r in replies],
                                                    [r.body["token_ids"] for r in replies])
        return Answer(200, body, response_headers)

    async def _openai(self, method: str, path: str, headers: dict, body: AsyncIterator[bytes], request_id: str,
                      ) -> Answer:
        name = self.config.model_name
        if not self._authorized(headers):
            return _openai_error(openai_chat.ChatError(401, "invalid or missing API key (the server's bearer token)",
                                                       code="invalid_api_key"))
        if path == "/v1/models" and method == "GET":
            return _json(200, openai_chat.models(name))
        if path != "/v1/chat/completions" or method != "POST":
            return _openai_error(openai_chat.ChatError(404, f"no such endpoint: {quote(method)} {quote(path)}"))
        try:
            chat = openai_chat.parse_chat(await self._read(headers, body), name)
        except ServingError as error:
            return _openai_error(openai_chat.ChatError(error.status, error.message))
        except openai_chat.ChatError as error:
            return _openai_error(error)
        request = await self.service.build_async(chat.image, chat.options, request_id)
        if isinstance(request, ServingError):
            return _openai_error(openai_chat.ChatError(request.status, request.message))
        request.stream = chat.stream
        handle = self.service.submit(request)
        if isinstance(handle, ServingError):  # the queue is full
            answer = _openai_error(openai_chat.ChatError(handle.status, handle.message))
            answer.headers.update(handle.headers)
            return answer
        config = self.service.captioner.config
        stops, prefix = set(config.tokenizer.stop_token_ids), config.mapper.prefix_length
        if not chat.stream:
            try:
                result = await handle.wait()  # this task cancelled (client gone): the request is cancelled
            except CaptionFailed as failure:
                self._record(self.service.reply(handle, failure))
                return _openai_error(openai_chat.ChatError(failure.status, failure.message))
            self._record(self.service.reply(handle, result))
            finished = bool(result.token_ids) and result.token_ids[-1] in stops
            return _json(200, openai_chat.completion(chat, name, result.caption, result.token_ids, finished, prefix))
        return Answer(200, self._events(chat, handle, stops, prefix),
                      {"content-type": "text/event-stream", "cache-control": "no-cache"})

    async def _events(self, chat: openai_chat.ChatRequest, handle, stops: set[int], prefix: int) -> AsyncIterator[bytes]:
        """The streamed answer: a role chunk, a chunk per settled token, the finish, usage if asked, [DONE].
        The client going away ends the iteration early, and that cancels the request (CaptionHandle.stream)."""
        name = self.config.model_name
        yield openai_chat.chunk(chat, name, {"role": "assistant", "content": ""})
        tokens: list[int] = []
        try:
            async for event in handle.stream():
                tokens += event.token_ids
                if event.text:
                    yield openai_chat.chunk(chat, name, {"content": event.text})
        except CaptionFailed as failure:
            self._record(self.service.reply(handle, failure))
            yield openai_chat.event(openai_chat.ChatError(failure.status, failure.message).body())
            yield openai_chat.DONE
            return
        self._record(self.service.reply(handle, handle.result()))
        yield openai_chat.chunk(chat, name, {}, "stop" if tokens and tokens[-1] in stops else "length")
        if chat.include_usage:
            yield openai_chat.chunk(chat, name, {}, usage_counts=openai_chat.usage(prefix, len(tokens)))
        yield openai_chat.DONE

    def _record(self, reply: Reply) -> None:
        if self.on_reply is not None:
            self.on_reply(reply)


def _openai_error(error: "openai_chat.ChatError") -> Answer:
    return _refused(error.status, error.body(), error.message)


def _image_options(options: dict, index: int) -> dict:
    """Image i of a seeded v2 request samples with seed + i, as item i of `clipcap caption` does."""
    seed = options.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return {**options, "seed": seed + index}
    return options
