"""The output of a bulk run: Parquet shards written atomically, the ids they hold (resume), and the manifest.

A shard is written to `part-NNNNN.parquet.tmp` and renamed into place, so a process killed mid-write
leaves at most a `.tmp` file, which never counts and is removed on the next start. The set of images
already done is read back from the shards present, nothing else: there is no separate state file to
disagree with them. The manifest records what produced the shards; a restart with different
settings is refused rather than mixing two runs' captions in one output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_FILE = "manifest.json"
SHARD_GLOB = "part-*.parquet"


class OutputError(RuntimeError):
    """The output folder holds another run's shards (different bundle or settings); nothing was written."""


def shard_schema(embeddings: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),  # deterministic image id: relative path, listed path, or tar/key
        pa.field("path", pa.string(), nullable=False),  # the file read (the tar shard for WebDataset inputs)
        pa.field("caption", pa.string()),  # null when the image failed
        pa.field("token_ids", pa.list_(pa.int32())),  # generated ids, the stop token included when produced
        pa.field("error", pa.string()),  # why the image has no caption; null on success
    ]
    if embeddings:
        fields.insert(4, pa.field("embedding", pa.list_(pa.float32())))  # the CLIP image embedding, (prefix_size,)
    return pa.schema(fields)


def shard_paths(out: Path) -> list[Path]:
    return sorted(Path(out).glob(SHARD_GLOB))


def done_ids(out: Path) -> set[str]:
    """Ids present in the complete shards of `out`; stale `.tmp` files of a killed run are removed."""
    for stale in Path(out).glob(SHARD_GLOB + ".tmp"):
        stale.unlink()
    ids: set[str] = set()
    for path in shard_paths(out):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


class ShardWriter:
    """Buffers rows and writes every `shard_size` of them as the next numbered shard, atomically."""

    def __init__(self, out: Path, shard_size: int, embeddings: bool):
        self.out = Path(out)
        self.shard_size = shard_size
        self.schema = shard_schema(embeddings)
        existing = [int(p.name.split("-")[1].split(".")[0]) for p in shard_paths(self.out)]
        self.next_index = max(existing, default=-1) + 1
        self.rows: list[dict] = []
        self.written: list[str] = []  # shard file names written by this process

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        while len(self.rows) >= self.shard_size:
            self._write(self.rows[:self.shard_size])
            self.rows = self.rows[self.shard_size:]

    def close(self) -> None:
        if self.rows:
            self._write(self.rows)
            self.rows = []

    def _write(self, rows: list[dict]) -> None:
        name = f"part-{self.next_index:05d}.parquet"
        tmp = self.out / (name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name says the shard is complete
        os.replace(tmp, self.out / name)
        self.next_index += 1
        self.written.append(name)


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume into an output made with other settings; else record them (status 'running')."""
    path = Path(out) / MANIFEST_FILE
    if path.is_file():
        previous = json.loads(path.read_text()).get("settings")
        if previous != settings and shard_paths(out):
            changed = "; ".join(f"{name}: {before!r} then, {now!r} now"
                                for name, before, now in _differences(previous or {}, settings))
            raise OutputError(f"{out} holds shards of a run with other settings ({changed}); "
                              f"use another --out, or the same command as before to resume")
    write_manifest(out, {"status": "running", "settings": settings})


def _differences(before: dict, now: dict, prefix: str = ""):
    """(dotted name, value before, value now) of every setting that differs, nested options named one by one."""
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}", old, new


def write_manifest(out: Path, manifest: dict) -> Path:
    path = Path(out) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path
