"""Where the images of a bulk run come from: a folder, a list of paths (text, CSV, Parquet), or WebDataset tars.

Every source becomes a `Listing` of `ImageRef`s with a deterministic id (the path relative to the folder,
the path as listed, or `tar/key`), in a deterministic order, before a single image is read: the id is
what resume matches on. Reading the bytes is a separate, cheap step (`read_bytes`) that the local
engine calls in its loop and the Ray engine calls inside its read tasks. A folder walk (and a tar
shard) picks files by the extensions of the accepted formats (clipcap.image_formats); the files of a
folder it leaves out are counted by extension, so a run can say what it did not read.
"""
from __future__ import annotations

import csv
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from clipcap.image_formats import DEFAULT_FORMATS, extensions
LIST_COLUMNS = ("path", "image", "file", "filename")  # CSV / Parquet column names read as the image path


class SourceError(ValueError):
    """The input cannot be listed (missing, unknown kind, no path column); nothing has been captioned."""


@dataclass(frozen=True)
class ImageRef:
    id: str  # deterministic and unique within the input: what the output and resume are keyed on
    path: str  # the file to read: the image itself, or the tar shard holding it
    offset: int = -1  # byte offset of the member's data inside a tar shard; -1 for a plain file
    size: int = -1  # member size in bytes inside a tar shard; -1 for a plain file


@dataclass
class Listing:
    refs: list[ImageRef]  # the images, unique ids, deterministic order
    skipped: dict[str, int] = field(default_factory=dict)  # folder files not of an accepted format, by extension


def read_bytes(ref: ImageRef) -> bytes:
    """The image's bytes; OSError (missing file, short tar) is the caller's to record."""
    if ref.offset < 0:
        return Path(ref.path).read_bytes()
    with open(ref.path, "rb") as shard:
        shard.seek(ref.offset)
        data = shard.read(ref.size)
    if len(data) != ref.size:
        raise OSError(f"{ref.path}: truncated tar member ({len(data)} of {ref.size} bytes)")
    return data


def list_images(source: str | Path, formats: Iterable[str] = DEFAULT_FORMATS) -> Listing:
    """Every image of `source`, unique ids, deterministic order. Kinds are told apart by name:

    a directory of images (recursive, unless it holds only `.tar` files: then WebDataset shards),
    a `.tar` file, or a `.txt` / `.csv` / `.parquet` list of image paths (relative to the list's folder).
    A folder or a tar contributes the files with an extension of `formats`; a list, every path it names
    (a file of another format fails its row).
    """
    source = Path(source)
    endings = extensions(formats)
    if source.is_dir():
        files = [p for p in sorted(source.rglob("*")) if p.is_file()]
        images = [p for p in files if p.suffix.lower() in endings]
        tars = sorted(source.glob("*.tar"))
        if tars and not images:
            return Listing(_unique(ref for tar in tars for ref in _tar_refs(tar, tar.name, endings)))
        skipped = Counter(p.suffix.lower() or p.name for p in files if p.suffix.lower() not in endings)
        return Listing(_unique(ImageRef(p.relative_to(source).as_posix(), str(p)) for p in images),
                       dict(sorted(skipped.items())))
    if not source.is_file():
        raise SourceError(f"{source}: no such file or directory")
    suffix = source.suffix.lower()
    if suffix == ".tar":
        return Listing(_unique(_tar_refs(source, source.name, endings)))
    if suffix in (".txt", ".csv", ".parquet"):
        return Listing(_unique(ImageRef(name, str(source.parent / name)) for name in _listed_paths(source)))
    raise SourceError(f"{source}: not a folder, .tar shard or .txt/.csv/.parquet list of image paths")


def _unique(refs) -> list[ImageRef]:
    """First occurrence of each id wins: a path listed twice is captioned once."""
    seen: dict[str, ImageRef] = {}
    for ref in refs:
        seen.setdefault(ref.id, ref)
    return list(seen.values())


def _tar_refs(tar_path: Path, label: str, endings: tuple[str, ...]):
    """WebDataset layout: members grouped by basename key; the image is the member with an image extension
    (the other members of a key, captions and metadata, are not images and are not counted as skipped)."""
    try:
        with tarfile.open(tar_path, "r:") as tar:  # uncompressed only: members are read by offset
            for member in tar:
                name = Path(member.name)
                if member.isfile() and name.suffix.lower() in endings:
                    key = (name.parent / name.stem).as_posix()
                    yield ImageRef(f"{label}/{key}", str(tar_path), member.offset_data, member.size)
    except tarfile.ReadError as error:
        raise SourceError(f"{tar_path}: not an uncompressed tar shard ({error})") from None


def _listed_paths(source: Path) -> list[str]:
    suffix = source.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in source.read_text().splitlines() if line.strip()]
    if suffix == ".csv":
        with open(source, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = rows[0].keys() if rows else ()
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        columns, rows = table.column_names, table.to_pylist()
    column = next((c for c in LIST_COLUMNS if c in columns), None)
    if column is None:
        if not rows:
            return []
        raise SourceError(f"{source}: no path column (one of {', '.join(LIST_COLUMNS)}); has {', '.join(columns)}")
    return [str(row[column]).strip() for row in rows if row[column] and str(row[column]).strip()]
