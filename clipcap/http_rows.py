"""An HTTP request as TorchServe hands it to the clipcap handler: one `row` (part name -> value) and its headers.

Fronts other than TorchServe (clipcap.serving_front) turn each request into exactly this pair, so
`CaptionService.parse_batch` applies every request rule (forms, options, limits, errors) once, for
all fronts. What TorchServe 0.12 builds with serving/handler.py, and so what `request_row` builds:
- query-string parameters (only on the routes where TorchServe passes them on): one part each, text;
- multipart/form-data: one part per form part, by its name, as bytes; a later part of the same
  name replaces an earlier one in the row, as in TorchServe's dict. Without a boundary parameter the
  body is one part `"body"` (TorchServe's decoder then hands the bytes on whole); a body without its
  closing boundary holds no part (TorchServe's holds none either). A part without a
  Content-Disposition name, or a part that is itself multipart, is refused (400; TorchServe's Java
  decoder answers both with a 500 before the handler);
- any other body (raw image, JSON, text, none): the part `"body"` -> the bytes as received (the
  handler has TorchServe pass JSON on undecoded, so CaptionService parses and refuses it);
- in the headers: the request's own headers, each part's content type under its name (a file
  part's, '' for a text field), and every part name in order under `PART_NAMES`, as the handler
  records them, so a name sent twice is refused.
"""
from __future__ import annotations

from email import errors, policy
from email.parser import BytesParser
from urllib.parse import parse_qsl

from clipcap.serving import MULTIPART_TYPE, PART_NAMES, ServingError

Part = tuple[str, bytes, str]  # name, value, content type ('' for a text field)


def request_row(headers: dict[str, str], body: bytes, query: str = "") -> tuple[dict, dict]:
    """(row, headers) for one request; `headers` maps header names (any case) to their values.
    ServingError for a multipart body that names a part badly."""
    parts: list[Part] = [(name, value.encode(), "") for name, value in parse_qsl(query, keep_blank_values=True)]
    content_type = next((value for name, value in headers.items() if name.lower() == "content-type"), "")
    form = form_parts(content_type, body) if content_type.split(";")[0].strip().lower() == MULTIPART_TYPE else None
    parts += form if form is not None else [("body", body, content_type)]
    row = {name: value for name, value, _ in parts}
    part_headers = {name: {"content-type": part_type} for name, _, part_type in parts}
    return row, {**part_headers, **headers, PART_NAMES: [name for name, _, _ in parts]}


def form_parts(content_type: str, body: bytes) -> list[Part] | None:
    """The named parts of a multipart/form-data body: None without a boundary parameter; none when the
    body holds none or lacks its closing boundary, which CaptionService answers as an empty request. A
    part with a filename is a file (content type application/octet-stream when it states none), one
    without is a text field."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("utf-8", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if message.get_boundary() is None:
        return None
    if not message.is_multipart() or any(isinstance(d, errors.CloseBoundaryNotFoundDefect) for d in message.defects):
        return []
    parts = []
    for index, part in enumerate(message.iter_parts()):
        if part.is_multipart():
            raise ServingError(400, f"multipart part {index} is itself multipart: send the image as one file part")
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ServingError(400, f'multipart part {index} has no Content-Disposition: form-data; name="..."; '
                                    f"send each part with a name (curl -F data=@photo.jpg)")
        is_file = part.get_param("filename", header="content-disposition") is not None
        file_type = (part.get_content_type() if part.get("content-type") else "application/octet-stream") if is_file else ""
        parts.append((str(name), part.get_payload(decode=True) or b"", file_type))
    return parts
