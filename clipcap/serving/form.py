"""One HTTP caption request as its named parts (`Form`), however a front received it.

Every front hands CaptionService a `Form`, which applies the request rules (forms, options, limits,
errors) once for all fronts:
- the HTTP front reads it off the wire with `read_form`: query-string parameters (on the routes that
  take them) as text fields, then a multipart/form-data body's parts, or any other body (raw image,
  JSON, text, none) as the one part `BODY`;
- TorchServe's handler turns the row TorchServe built (part name -> value, each name once) into one
  with `from_torchserve`, its part names in order from `PART_NAMES`, which the handler records.
A name that arrives twice stays twice in `parts`, so CaptionService refuses it on every front.
"""
from __future__ import annotations

from dataclasses import dataclass
from email import errors, policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qsl

from clipcap.decoding_options import REQUEST_OPTIONS

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FORM_TYPE = "application/x-www-form-urlencoded"  # curl's default for -d / --data-binary: an image body is sniffed
RAW_TYPES = ("application/octet-stream", "")  # plus every image/*: the bytes, not the header, decide the format
BODY = "body"  # the part holding a body that is not multipart (TorchServe's name for it too)
# The TorchServe handler lists every part and field name of a request here: TorchServe's row keeps one per name.
PART_NAMES = "clipcap-part-names"


class FormError(ValueError):
    """A multipart body whose parts cannot be named (the front answers 400 with this message)."""


@dataclass(frozen=True)
class Part:
    name: str  # the form field's name, a query parameter's, or BODY
    value: Any  # bytes as received; TorchServe may hand text (str) or an already parsed JSON body
    content_type: str | None  # a file part's own type; '' for a text field; None: not known (options are fields)

    @property
    def is_file(self) -> bool:
        if self.content_type is None:
            return self.name not in REQUEST_OPTIONS
        return bool(self.content_type)


@dataclass(frozen=True)
class Form:
    content_type: str  # the request's media type, lower case, parameters dropped ('' when none was sent)
    parts: tuple[Part, ...]  # in the order they arrived; a repeated name stays repeated
    headers: dict  # the request's headers (X-Request-ID names the request in log lines)

    def part(self, name: str) -> Part | None:
        """The last part of that name (None when there is none)."""
        return next((part for part in reversed(self.parts) if part.name == name), None)


def media_type(headers: dict) -> str:
    """A request's media type from its headers (names in any case), lower case, parameters dropped."""
    value = next((v for k, v in headers.items() if k.lower() == "content-type" and isinstance(v, str)), "")
    return value.split(";")[0].strip().lower()


def read_form(headers: dict[str, str], body: bytes, query: str = "") -> Form:
    """A request as it came over HTTP; FormError for a multipart body that names a part badly."""
    parts = [Part(name, value.encode(), "") for name, value in parse_qsl(query, keep_blank_values=True)]
    full_type = next((value for name, value in headers.items() if name.lower() == "content-type"), "")
    form = form_parts(full_type, body) if media_type(headers) == MULTIPART_TYPE else None
    parts += form if form is not None else [Part(BODY, body, full_type)]
    return Form(media_type(headers), tuple(parts), headers)


def from_torchserve(row: dict, headers: dict) -> Form:
    """TorchServe's row and request headers (each part's content type under its name) as a Form. The
    names come from PART_NAMES when the handler recorded them (a list), else from the row."""
    names = headers.get(PART_NAMES)
    names = names if isinstance(names, list) else list(row)

    def content_type(name: str) -> str | None:
        part = headers.get(name)
        return str(part.get("content-type") or "") if isinstance(part, dict) else None

    return Form(media_type(headers), tuple(Part(name, row.get(name), content_type(name)) for name in names), headers)


def form_parts(content_type: str, body: bytes) -> list[Part] | None:
    """The named parts of a multipart/form-data body: None without a boundary parameter (the body is then
    one part, as TorchServe hands it on); none when the body holds none or lacks its closing boundary,
    which CaptionService answers as an empty request. A part with a filename is a file (content type
    application/octet-stream when it states none), one without is a text field. A part without a
    Content-Disposition name, or one that is itself multipart, is refused (TorchServe's Java decoder
    answers both with a 500 before the handler)."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("utf-8", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if message.get_boundary() is None:
        return None
    if not message.is_multipart() or any(isinstance(d, errors.CloseBoundaryNotFoundDefect) for d in message.defects):
        return []
    parts = []
    for index, part in enumerate(message.iter_parts()):
        if part.is_multipart():
            raise FormError(f"multipart part {index} is itself multipart: send the image as one file part")
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise FormError(f'multipart part {index} has no Content-Disposition: form-data; name="..."; '
                            f"send each part with a name (curl -F data=@photo.jpg)")
        is_file = part.get_param("filename", header="content-disposition") is not None
        file_type = (part.get_content_type() if part.get("content-type") else "application/octet-stream") if is_file else ""
        parts.append(Part(str(name), part.get_payload(decode=True) or b"", file_type))
    return parts
