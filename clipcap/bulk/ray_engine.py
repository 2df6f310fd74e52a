"""The Ray Data engine: `map_batches` over a dataset of image bytes, with a pool of captioner actors.

Imported only for `--engine ray` (Ray is an optional extra). Without an address it starts an
embedded Ray on this machine (small object store, no dashboard, bound to 127.0.0.1, no usage
stats) and stops it afterwards; with `ray_address` it joins an existing cluster, whose nodes must
be able to read the input paths and the bundle. Rows stream back to the driver, which writes the
shards: one writer, so shards stay atomic and resume works exactly as with the local engine.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from clipcap.bulk.captioning import caption_rows
from clipcap.bulk.local import read_all
from clipcap.bulk.shards import shard_schema
from clipcap.bulk.sources import ImageRef
from clipcap.decoding import DecodingOptions

EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20  # image bytes stream through it; Ray Data applies backpressure
MAX_BLOCKS = 4096  # above this, blocks hold several batches: a million refs stay a small plan


def read_batch(batch):
    """pyarrow batch of refs -> the same rows with the image bytes (or the read error) added."""
    import pyarrow as pa

    rows = batch.to_pylist()
    blobs, errors = read_all([ImageRef(**row) for row in rows])
    return pa.table({"id": [r["id"] for r in rows], "path": [r["path"] for r in rows],
                     "data": pa.array(blobs, pa.binary()), "read_error": pa.array(errors, pa.string())})


class CaptionActor:
    """Opens the Captioner once per actor; each call captions one batch of image bytes."""

    def __init__(self, bundle: str, backend: str | None, device: str, options: DecodingOptions, embeddings: bool,
                 formats: tuple[str, ...]):
        from clipcap.captioner import Captioner

        self.captioner = Captioner.from_path(bundle, backend=backend, device=device)
        self.options = options
        self.embeddings = embeddings
        self.formats = formats

    def __call__(self, batch):
        import pyarrow as pa

        columns = batch.to_pydict()
        rows = caption_rows(self.captioner, columns["id"], columns["path"], columns["data"], columns["read_error"],
                            self.options, self.embeddings, self.formats)
        return pa.Table.from_pylist(rows, schema=shard_schema(self.embeddings))


def _same_clipcap() -> str:
    """PYTHONPATH that makes the embedded Ray's workers import the driver's clipcap (a checkout, not an install)."""
    import clipcap

    return os.pathsep.join(filter(None, [str(Path(clipcap.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))


def caption_refs_on_ray(refs: list[ImageRef], bundle: str, backend: str | None, device: str, options: DecodingOptions,
                        batch_size: int, embeddings: bool, formats: tuple[str, ...], address: str | None = None,
                        actors: int = 2,
                        num_gpus: float = 0.0) -> Iterator[list[dict]]:
    """Rows for `refs` as the actors finish them (not in input order), one list per batch."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    elif started:
        ray.init(num_cpus=max(os.cpu_count() or 1, actors + 1), object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                 include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": _same_clipcap()}})
    try:
        if not refs:
            return
        ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's tqdm bar is the one
        # One block per batch (up to MAX_BLOCKS): results reach the driver, its bar and its shards batch by batch.
        blocks = min(MAX_BLOCKS, -(-len(refs) // batch_size))
        dataset = ray.data.from_items([asdict(ref) for ref in refs], override_num_blocks=blocks)
        dataset = dataset.map_batches(read_batch, batch_size=batch_size, batch_format="pyarrow")
        dataset = dataset.map_batches(
            CaptionActor, batch_size=batch_size, batch_format="pyarrow", num_gpus=num_gpus,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"bundle": str(bundle), "backend": backend, "device": device,
                                   "options": options, "embeddings": embeddings, "formats": formats})
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch.to_pylist()
    finally:
        if started:
            ray.shutdown()
