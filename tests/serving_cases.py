"""The request table every serving front must answer alike: TorchServe (tests/test_serving_e2e.py),
Ray Serve (tests/test_serving_ray.py) and the Ray-free front in this process (tests/test_serving_front.py).

Each case is one HTTP request to /predictions/<model> and the status and message fragment that
serving/README.md documents for it; the good forms come first and must caption like the library.
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
    headers: dict
    status: int  # the HTTP status both fronts answer
    fragment: str  # in the error message; for a 200: "" (default options) or "options" (OPTIONS)
    method: str = "POST"


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


def cases(good: bytes) -> list[Case]:
    b64 = base64.b64encode(good).decode()
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
    ]
