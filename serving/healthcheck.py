"""Readiness that tells the truth: caption a tiny built-in image through the served model within a deadline.

TorchServe's /ping answers "Healthy" from the Java frontend alone, while the worker is dead or hung;
this check sends a real prediction (an 8x8 PNG built here) and exits 0 only when a caption with
tokens comes back in time, 1 otherwise, saying why on stderr. Standard library only, so a probe does
not pay for importing torch. Token authorization: the key is read from --key-file when that file
exists: TorchServe's key_file.json (its inference key), or a file holding the token alone, as
`clipcap serve-ray` writes serve-ray-token; else no key is sent (KServe: tokens off).

  python serving/healthcheck.py                               # http://127.0.0.1:8080, model clipcap, 5 s
  python serving/healthcheck.py --url http://127.0.0.1:8080 --model clipcap --timeout 3 --key-file key_file.json
  python serving/healthcheck.py --url http://127.0.0.1:8000 --key-file serve-ray-token   # Ray Serve
"""
from __future__ import annotations

import argparse
import http.client
import json
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path


def tiny_png(size: int = 8, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A size x size PNG of one colour, written with zlib: no image library needed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(rgb) * size for _ in range(size))  # filter byte 0 + RGB pixels per row
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def read_key(key_file: Path) -> str:
    """The inference key in TorchServe's key_file.json, or the token a plain-text file holds (serve-ray-token)."""
    try:
        text = key_file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RuntimeError(f"cannot read the key file {key_file}: {error}") from None
    try:
        return json.loads(text)["inference"]["key"]
    except ValueError:  # not JSON: the token itself
        token = text.strip()
    except (KeyError, TypeError):
        raise RuntimeError(f"{key_file} is JSON without TorchServe's inference key") from None
    if not token or any(c.isspace() for c in token):
        raise RuntimeError(f"{key_file} holds neither TorchServe's key file nor one token")
    return token


def check(url: str, model: str, timeout_s: float, key_file: Path) -> str:
    """The caption of the built-in image, or RuntimeError saying why there is none."""
    request = urllib.request.Request(f"{url.rstrip('/')}/predictions/{model}", data=tiny_png(), method="POST",
                                     headers={"Content-Type": "image/png", "X-Request-ID": "healthcheck"})
    if key_file.is_file():
        request.add_header("Authorization", f"Bearer {read_key(key_file)}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"HTTP {error.code}: {error.read()[:200]!r}") from None
    except http.client.HTTPException as error:  # something answered, but not in HTTP
        raise RuntimeError(f"{url} does not answer HTTP ({type(error).__name__}: {str(error)[:100]!r})") from None
    except (OSError, ValueError) as error:  # refused, timed out (socket.timeout is an OSError), not JSON
        raise RuntimeError(f"no caption within {timeout_s} s: {error}") from None
    if not (isinstance(body, dict) and body.get("token_ids") and isinstance(body.get("caption"), str)):
        raise RuntimeError(f"an answer without a caption: {str(body)[:200]}")
    return body["caption"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe's inference address")
    parser.add_argument("--model", default="clipcap")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the whole caption")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="TorchServe's key_file.json or a file holding the token (serve-ray-token); "
                             "ignored when absent")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        caption = check(args.url, args.model, args.timeout, args.key_file)
    except RuntimeError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print(f"healthy: {caption!r} in {time.monotonic() - start:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
