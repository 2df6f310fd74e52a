"""The single-machine engine: one Captioner in this process, batches in input order. No Ray here."""
from __future__ import annotations

from collections.abc import Iterator

from clipcap.bulk.captioning import caption_rows
from clipcap.bulk.sources import ImageRef, read_bytes
from clipcap.captioner import Captioner
from clipcap.decoding import DecodingOptions


def read_all(refs: list[ImageRef]) -> tuple[list[bytes | None], list[str | None]]:
    """Bytes of each ref, or None with the reason (missing file, short tar member)."""
    blobs, errors = [], []
    for ref in refs:
        try:
            blobs.append(read_bytes(ref))
            errors.append(None)
        except OSError as error:
            blobs.append(None)
            errors.append("file not found" if isinstance(error, FileNotFoundError) else str(error.strerror or error))
    return blobs, errors


def caption_refs(refs: list[ImageRef], bundle: str, backend: str | None, device: str, options: DecodingOptions,
                 batch_size: int, embeddings: bool, formats: tuple[str, ...]) -> Iterator[list[dict]]:
    """Rows for `refs`, one list per batch of `batch_size` images."""
    captioner = Captioner.from_path(bundle, backend=backend, device=device)
    for start in range(0, len(refs), batch_size):
        batch = refs[start:start + batch_size]
        blobs, errors = read_all(batch)
        yield caption_rows(captioner, [r.id for r in batch], [r.path for r in batch], blobs, errors,
                           options, embeddings, formats)
