"""What Ray Serve's HTTP proxy refuses before a request reaches a replica: a request head (request line
and headers) over 16 KiB (431), and a Content-Length over the body limit (413), answered before the
proxy reads a byte of the body, so a client that sent `Expect: 100-continue` gets the 413 instead of
"100 Continue" and uploads nothing. Every refusal is logged (status, reason, the client's
X-Request-ID; never a header value or body byte) and closes the connection.

Ray Serve calls `proxy_middlewares` in each HTTP proxy when $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
names it (`clipcap serve-ray` sets it, and the limits in $CLIPCAP_MAX_HEADER_BYTES and
$CLIPCAP_MAX_REQUEST_BYTES, before its embedded Ray starts). The standard library only: the proxy
does not import torch.
"""
from __future__ import annotations

import http
import json
import logging
import os

from clipcap.quoting import quote

CALLBACK = "clipcap.http_limits:proxy_middlewares"  # the value of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
HEADER_LIMIT_ENV = "CLIPCAP_MAX_HEADER_BYTES"
BODY_LIMIT_ENV = "CLIPCAP_MAX_REQUEST_BYTES"
MAX_HEADER_BYTES = 16 * 2**10  # request line and headers together
MAX_REQUEST_BYTES = 16 * 2**20  # the body, as TorchServe's max_request_size in serving/config.properties

logger = logging.getLogger(__name__)


def head_bytes(scope: dict) -> int:
    """The request head's size as sent: request line and every header line (name, ': ', value, CRLF)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"].encode()) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def refusal(scope: dict, max_header_bytes: int, max_request_bytes: int) -> tuple[int, str] | None:
    """(status, reason) for a request refused from its head alone, else None."""
    size = head_bytes(scope)
    if size > max_header_bytes:
        return 431, f"request line and headers are {size} bytes, over the limit of {max_header_bytes} bytes"
    lengths = [value for name, value in scope["headers"] if name.lower() == b"content-length"]
    if lengths and lengths[-1].isdigit() and int(lengths[-1]) > max_request_bytes:
        return 413, f"request body of {quote(lengths[-1].decode())} bytes is over the limit of {max_request_bytes} bytes"
    return None


class RequestLimits:
    """ASGI middleware: requests `refusal` names are answered here, the others passed on untouched."""

    def __init__(self, app, max_header_bytes: int = MAX_HEADER_BYTES, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        refused = refusal(scope, self.max_header_bytes, self.max_request_bytes) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, reason = refused
        client_id = next((v for k, v in scope["headers"] if k.lower() == b"x-request-id"), b"").decode("latin-1")
        logger.info("request (X-Request-ID %s) refused by the HTTP proxy: %d %s", quote(client_id, 64), status, reason)
        if scope["path"].startswith("/v2"):  # the Open Inference Protocol's error shape, else TorchServe's
            body = {"error": reason}
        else:
            body = {"code": status, "type": http.HTTPStatus(status).phrase.replace(" ", ""), "message": reason}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


def log_through_serve(name: str) -> None:
    """Have logger `name` write INFO lines where Ray Serve's own go (this process's Serve log file):
    Ray configures only its "ray.serve" logger, and the root logger drops INFO."""
    serve = logging.getLogger("ray.serve")
    target = logging.getLogger(name)
    target.setLevel(logging.INFO)
    target.handlers = list(serve.handlers)
    target.propagate = not serve.handlers


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback: the middleware with the limits from the environment."""
    from starlette.middleware import Middleware

    log_through_serve(__name__)
    return [Middleware(RequestLimits, max_header_bytes=int(os.environ.get(HEADER_LIMIT_ENV, MAX_HEADER_BYTES)),
                       max_request_bytes=int(os.environ.get(BODY_LIMIT_ENV, MAX_REQUEST_BYTES)))]
