"""An HTTP request as TorchServe hands it to a handler: one `row` (part name -> value) and its headers.

Fronts other than TorchServe (clipcap.serving_ray) turn each request into exactly this pair, so
`CaptionService.parse_batch` applies every request rule (forms, options, limits, errors) once, for
all fronts. What TorchServe 0.12 builds, and so what `request_row` builds:
- query-string parameters: one entry each, their text as UTF-8 bytes;
- multipart/form-data: one entry per part, by the part's name (text fields and files alike as
  bytes); a later part of the same name replaces an earlier one, as in TorchServe's dict;
- any other body (raw image, JSON, text, none): `"body"` -> the bytes as received. TorchServe
  decodes a JSON body when it can and passes the bytes on when it cannot; CaptionService reads
  either, so the bytes are handed on and JSON is parsed (and refused) in one place.
"""
from __future__ import annotations

from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qsl

MULTIPART_TYPE = "multipart/form-data"


def request_row(headers: dict[str, str], body: bytes, query: str = "") -> tuple[dict, dict]:
    """(row, headers) for one request; `headers` maps header names (any case) to their values."""
    row: dict = {name: value.encode() for name, value in parse_qsl(query, keep_blank_values=True)}
    content_type = next((value for name, value in headers.items() if name.lower() == "content-type"), "")
    if content_type.split(";")[0].strip().lower() == MULTIPART_TYPE:
        row.update(form_parts(content_type, body))
    else:
        row["body"] = body
    return row, dict(headers)


def form_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """name -> bytes of each named part of a multipart/form-data body; {} when it holds none (no
    boundary, or not multipart at all), which CaptionService answers as an empty request."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("utf-8", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        return {}
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = part.get_payload(decode=True) or b""
    return parts
