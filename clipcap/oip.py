"""The Open Inference Protocol (KServe v2) for clipcap: the model's metadata, and infer requests and
responses in JSON or with the binary tensor data extension (what `tritonclient.http` sends).

One infer request carries N encoded images in the BYTES input `image` (shape [N]; in JSON each
element is the image's base64 text, in the binary extension its raw bytes) and the decoding options
as request `parameters`, the same keys as the JSON request form. The answer holds the BYTES output
`caption` (shape [N]) and the INT64 output `token_ids` (shape [N, T], rows padded with -1, T the
longest). Image and option rules are CaptionService's; this module only reads and writes tensors.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from clipcap.quoting import QUOTE_NAMES, quote, quote_names

INPUT_NAME = "image"
OUTPUTS = {"caption": "BYTES", "token_ids": "INT64"}
TOKEN_PAD = -1  # token ids are >= 0
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension: the JSON part's length in bytes
# Request parameters the protocol reserves (tritonclient sends it); every other one is a decoding option.
RESERVED_PARAMETERS = ("binary_data_output",)
MAX_ID_CHARS = 256  # a request "id" is echoed in the answer: a longer one is refused, not echoed


class ProtocolError(Exception):
    """An infer request that is not valid v2; the answer is `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class InferRequest:
    images: list[bytes | str]  # encoded images in request order: raw bytes (binary data) or base64 text (JSON)
    options: dict  # decoding options in request keys, checked by CaptionService
    id: str | None = None  # echoed in the response
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))  # outputs to return, in order
    binary_outputs: set[str] = field(default_factory=set)  # outputs to return as binary data


def model_metadata(name: str) -> dict:
    return {"name": name, "platform": "clipcap", "versions": [],
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "caption", "datatype": "BYTES", "shape": [-1]},
                        {"name": "token_ids", "datatype": "INT64", "shape": [-1, -1]}]}


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """An infer request body (and its Inference-Header-Content-Length header, if any) -> InferRequest."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"{HEADER_LENGTH} must be an integer, got {quote(header_length)}") from None
        if not 0 <= length <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} is {length}, the body has {len(body)} bytes")
        header, binary = body[:length], body[length:]
    try:
        request = json.loads(header, object_pairs_hook=_object_without_repeated_keys)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(400, f"the inference header is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict) \
            or inputs[0].get("name") != INPUT_NAME:
        raise ProtocolError(400, f'the request needs exactly one input, named "{INPUT_NAME}"')
    images = _read_images(inputs[0], binary, max_images)
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, '"parameters" must be an object')
    outputs, binary_outputs = _requested_outputs(request.get("outputs"), parameters.get("binary_data_output") is True)
    if INPUT_NAME in parameters:
        raise ProtocolError(400, f'"{INPUT_NAME}" is the input tensor, not a parameter')
    options = {key: value for key, value in parameters.items() if key not in RESERVED_PARAMETERS}
    request_id = request.get("id")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise ProtocolError(400, f'"id" is {len(request_id)} characters, over the limit of {MAX_ID_CHARS}')
    return InferRequest(images, options, request_id if isinstance(request_id, str) else None, outputs, binary_outputs)


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are each given once (else ProtocolError), as CaptionService reads the JSON form."""
    counts = Counter(name for name, _ in pairs)
    if len(counts) != len(pairs):
        repeated = sorted(name for name, count in counts.items() if count > 1)
        raise ProtocolError(400, f"key(s) given more than once: {quote_names(repeated)}")
    return dict(pairs)


def _read_images(tensor: dict, binary: bytes, max_images: int) -> list[bytes]:
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(400, f'input "{INPUT_NAME}" must have datatype BYTES, got {quote(tensor.get("datatype"))}')
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                           for d in shape):
        raise ProtocolError(400, f'input "{INPUT_NAME}" needs a shape: a list of sizes, e.g. [N]')
    count = _elements(shape, max_images)
    if count == 0:
        raise ProtocolError(400, f'input "{INPUT_NAME}" holds no image')
    if count > max_images:
        raise ProtocolError(400, f"shape {_shape_text(shape)} holds more than {max_images} images, the limit of one request")
    size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor.get("parameters"), dict) else None
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ProtocolError(400, f"binary_data_size is {quote(size)}, the binary data holds {len(binary)} bytes")
        images = deserialize_bytes(binary)
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise ProtocolError(400, f'input "{INPUT_NAME}" needs "data": a flat list of base64 strings, one per image')
        images = data  # base64 text: CaptionService decodes and checks it like the JSON request form's
    if len(images) != count:
        raise ProtocolError(400, f'input "{INPUT_NAME}" has shape {_shape_text(shape)} ({count} elements) '
                                 f'but holds {len(images)}')
    return images


def _shape_text(shape: list[int]) -> str:
    """A shape as a message shows it: its first sizes, each quoted (a 4,000-digit size is not written out)."""
    shown = ", ".join(quote(size) for size in shape[:QUOTE_NAMES])
    return f"[{shown}]" if len(shape) <= QUOTE_NAMES else f"[{shown}, ...] ({len(shape)} sizes)"


def _elements(shape: list[int], limit: int) -> int:
    """The product of the sizes, counted only up to just past `limit` (a shape of 15,000 sizes of 2 is never multiplied out)."""
    if 0 in shape:
        return 0
    count = 1
    for size in shape:
        count *= size
        if count > limit:
            return limit + 1
    return count


def _requested_outputs(outputs: Any, all_binary: bool) -> tuple[list[str], set[str]]:
    if outputs is None:
        return list(OUTPUTS), set(OUTPUTS) if all_binary else set()
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in outputs):
        raise ProtocolError(400, f'"outputs" must list outputs by name; the model has {", ".join(OUTPUTS)}')
    names = [o["name"] for o in outputs]
    binary = {o["name"] for o in outputs if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")}
    return names, binary


def infer_response(name: str, request: InferRequest, captions: list[str], token_ids: list[list[int]],
                   ) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (the binary extension's when an output is sent as binary)."""
    width = max(len(ids) for ids in token_ids)
    tensors = {"caption": ([len(captions)], list(captions)),
               "token_ids": ([len(token_ids), width], [t for ids in token_ids for t in ids + [TOKEN_PAD] * (width - len(ids))])}
    outputs, blobs = [], []
    for output in request.outputs:
        shape, data = tensors[output]
        entry = {"name": output, "datatype": OUTPUTS[output], "shape": shape}
        if output in request.binary_outputs:
            blob = serialize_bytes([c.encode() for c in data]) if OUTPUTS[output] == "BYTES" else \
                struct.pack(f"<{len(data)}q", *data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = data
        outputs.append(entry)
    response = {"model_name": name, "outputs": outputs, **({"id": request.id} if request.id is not None else {})}
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def serialize_bytes(items: list[bytes]) -> bytes:
    """A BYTES tensor in the binary extension: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(blob: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError(400, "the binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(400, f"a binary element of {length} bytes runs past the end of the data")
        items.append(blob[offset:offset + length])
        offset += length
    return items
