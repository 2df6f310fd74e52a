"""The request table every serving front must answer alike: TorchServe (tests/test_serving_e2e.py),
Ray Serve (tests/test_serving_ray.py) and the Ray-free front in this process (tests/test_serving_front.py).

Each case is one HTTP request (to /predictions/<model> unless it names a path) and the status and
message fragment that serving/README.md documents for it; the good forms come first and must caption
like the library. Where one front cannot answer like the others (TorchServe's Java frontend, or Ray's
HTTP proxy, decides before any code of ours runs), the case says what that front answers and why
(`differs`), and serving/README.md says it too.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

from PIL import Image

OPTIONS = {"decoding": "beam", "beam_size": 3, "max_tokens": 12}  # the good forms with options use these
BOUNDARY = "clipcap-test-boundary"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    headers: dict  # two names that differ only in case are one header sent twice
    status: int  # the HTTP status every front answers
    fragment: str  # in the error message; for a 200: "" (default options) or "options" (OPTIONS)
    method: str = "POST"
    path: str = "/predictions/clipcap"  # with its query string, if any
    torchserve: tuple[int, str] | None = None  # (status, fragment) TorchServe answers instead, for `differs`
    ray: tuple[int, str] | None = None  # (status, fragment) Ray Serve's proxy answers instead, for `differs`
    differs: str = ""  # why a front answers otherwise
    over_http: bool = False  # about the HTTP framing itself: the in-process front never sees it

    def expected(self, front: str) -> tuple[int, str]:
        """(status, fragment) that `front` ("torchserve", "ray" or "in-process") answers."""
        return {"torchserve": self.torchserve, "ray": self.ray}.get(front) or (self.status, self.fragment)


def message(body: bytes) -> str:
    """An error answer's text: TorchServe's "message", the v2 protocol's "error", else the raw body."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body.decode("latin-1")
    return str(reply.get("message", reply.get("error", reply))) if isinstance(reply, dict) else str(reply)


def form(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, dict]:
    """multipart/form-data from (name, value, filename: a file part, or None: a text field)."""
    body = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"'.encode()
                    + (f'; filename="{filename}"\r\nContent-Type: image/png'.encode() if filename else b"")
                    + b"\r\n\r\n" + value + b"\r\n" for name, value, filename in parts)
    return body + f"--{BOUNDARY}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart(image: bytes, fields: dict) -> tuple[bytes, dict]:
    """Text fields, then the image as the file part "data"."""
    return form([(key, str(value).encode(), None) for key, value in fields.items()] + [("data", image, "image.png")])


def as_json(body: dict) -> tuple[bytes, dict]:
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def bomb() -> bytes:
    """20000x20000 pixels in ~50 kB: a 1-bit PNG of zeros."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def chunked(body: bytes) -> bytes:
    """`body` in HTTP/1.1 chunked transfer coding, as one chunk."""
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def cases(good: bytes) -> list[Case]:
    b64 = base64.b64encode(good).decode()
    file_part = b'Content-Disposition: form-data; name="data"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + good
    whole, form_headers = form([("data", good, "a.png")])
    nested = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="outer"\r\n'
              f'Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\n').encode() + file_part \
        + f"\r\n--inner--\r\n\r\n--{BOUNDARY}--\r\n".encode()
    java = "TorchServe's Java frontend decodes multipart forms before the handler"
    return [
        Case("raw body", good, {"Content-Type": "image/png"}, 200, ""),
        Case("raw body, no content type (curl -T)", good, {}, 200, "", method="PUT"),
        Case("raw body, octet-stream", good, {"Content-Type": "application/octet-stream"}, 200, ""),
        Case("JSON with options", *as_json({"image": b64, **OPTIONS}), 200, "options"),
        Case("multipart with options", *multipart(good, OPTIONS), 200, "options"),
        Case("empty body", b"", {"Content-Type": "image/png"}, 400, "empty request"),
        Case("not an image", b"hello, world", {"Content-Type": "application/octet-stream"}, 400, "not a recognised image"),
        Case("truncated image", good[: len(good) // 2], {"Content-Type": "image/png"}, 400, "truncated"),
        Case("decompression bomb", bomb(), {"Content-Type": "image/png"}, 400, "over the limit of 36000000 pixels"),
        Case("bad base64", *as_json({"image": "not*base64!"}), 400, "not valid base64"),
        Case("bad JSON", b'{"image": ', {"Content-Type": "application/json"}, 400, "not valid JSON"),
        Case("JSON without image", *as_json({"decoding": "greedy"}), 400, '"image"'),
        Case("beam size out of range", *as_json({"image": b64, "decoding": "beam", "beam_size": 1000}), 400, "beam_size"),
        Case("max_tokens out of range", *as_json({"image": b64, "max_tokens": 100000}), 400, "max_tokens"),
        Case("unknown option", *as_json({"image": b64, "url": "http://example.com/cat.jpg"}), 400, "unknown option"),
        Case("multipart with two files", *form([("data", good, "a.png"), ("more", good, "b.png")]), 400,
             "exactly one file part"),
        Case("multipart file part repeated", *form([("data", good, "a.png"), ("data", good, "b.png")]), 400,
             "sent more than once"),
        Case("multipart field repeated", *form([("data", good, "a.png"), ("decoding", b"beam", None),
                                                ("decoding", b"greedy", None)]), 400, "sent more than once"),
        Case("multipart unknown field", *form([("data", good, "a.png"), ("note", b"hi", None)]), 400,
             "unknown option(s) 'note'"),
        Case("JSON key repeated", f'{{"image": "{b64}", "decoding": "beam", "decoding": "greedy"}}'.encode(),
             {"Content-Type": "application/json"}, 400, "given more than once"),
        Case("JSON nested too deeply", b"[" * 100_000, {"Content-Type": "application/json"}, 400, "nested too deeply"),
        Case("option not a scalar", *as_json({"image": b64, "max_tokens": [1, 2]}), 400, "must be a string or a number"),
        Case("options over 4 KiB", *as_json({"image": b64, "decoding": "A" * 5000}), 413, "max_options_bytes"),
        Case("wrong content type", b"hello", {"Content-Type": "text/plain"}, 415, "not accepted"),
        Case("over-size image", b"\0" * (9 * 2**20), {"Content-Type": "image/png"}, 413, "over the limit of 8388608"),
        # curl --data-binary @photo.jpg without -H Content-Type sends application/x-www-form-urlencoded
        Case("form-urlencoded image", good, {"Content-Type": "application/x-www-form-urlencoded"}, 200, "",
             torchserve=(415, "not accepted"), differs="TorchServe's Java frontend decodes the form before the "
             "handler: a PNG reaches it without its bytes (415), a JPEG photo gets a Java 500"),
        Case("form-urlencoded text", b"hello=world", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
             "not accepted"),
        Case("multipart part without Content-Disposition", f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\n".encode()
             + good + f"\r\n--{BOUNDARY}--\r\n".encode(), form_headers, 400, "no Content-Disposition",
             torchserve=(500, "NullPointerException"), differs=java),
        Case("multipart without a boundary", whole, {"Content-Type": "multipart/form-data"}, 400,
             "not a recognised image"),
        Case("multipart nested", nested, form_headers, 400, "itself multipart", torchserve=(500, "Filename not found"),
             differs=java),
        Case("multipart unclosed", whole[: -len(f"--{BOUNDARY}--\r\n")], form_headers, 400, "empty request"),
        Case("two Content-Type headers: the last counts", good,
             {"Content-Type": "image/png", "content-type": "application/json"}, 400, "not valid JSON"),
        Case("Content-Length and chunked", chunked(good),
             {"Content-Type": "image/png", "Content-Length": "5", "Transfer-Encoding": "chunked"}, 200, "",
             ray=(400, "Invalid HTTP request"), over_http=True, differs="Ray's HTTP proxy (uvicorn) refuses a request "
             "with both, as RFC 9112 allows; TorchServe's Netty follows Transfer-Encoding"),
        Case("GET /predictions", b"", {}, 400, "empty request", method="GET"),
        Case("v2 infer, a JSON key repeated", b'{"inputs": [], "inputs": [], "id": "a"}',
             {"Content-Type": "application/json"}, 400, "given more than once", path="/v2/models/clipcap/infer"),
        Case("/invocations for another model", good, {"Content-Type": "image/png"}, 404, "Model not found",
             path="/invocations?model_name=nope"),
        Case("v2 infer of a model version", b"{}", {"Content-Type": "application/json"}, 404, "not found",
             path="/v2/models/clipcap/versions/1/infer"),
    ]
