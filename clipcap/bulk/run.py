"""`caption_dataset`: list the input, skip what the output already holds, caption the rest, write shards + manifest."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from clipcap.bulk.local import caption_refs
from clipcap.bulk.shards import ShardWriter, check_settings, done_ids, shard_paths, write_manifest
from clipcap.bulk.sources import list_images
from clipcap.formats.model_bundle import load_config
from clipcap.decoding import DecodingError, DecodingOptions
from clipcap.image_formats import DEFAULT_FORMATS, check_formats

ENGINES = ("local", "ray")


class Interrupted(Exception):
    """Ctrl-C stopped the run: captioned rows are in complete shards, the manifest's status is 'interrupted'."""

    def __init__(self, manifest: dict):
        super().__init__("interrupted")
        self.manifest = manifest


@dataclass
class BulkConfig:
    bundle: str  # model bundle or export bundle directory
    source: str  # folder of images, .txt/.csv/.parquet list of paths, .tar shard, or folder of .tar shards
    out: str  # output folder: part-NNNNN.parquet shards + manifest.json (created)
    options: DecodingOptions = field(default_factory=DecodingOptions)  # as `clipcap caption`
    backend: str | None = None  # torch | onnxruntime | tensorrt; None: the one the bundle's kind needs
    device: str = "cpu"  # cpu, cuda[:N] (per actor with the ray engine)
    batch_size: int = 8  # images captioned together
    shard_size: int = 1000  # rows per Parquet shard: the unit of atomic writes and of lost work on a kill
    embeddings: bool = False  # also store each image's CLIP embedding (every backend: export encoders output it)
    formats: tuple[str, ...] = DEFAULT_FORMATS  # image formats read (clipcap.image_formats); a folder walk picks
    # their extensions (others are counted as skipped), a listed file of another format fails its row
    engine: str = "local"  # local (this process) | ray (Ray Data actors)
    ray_address: str | None = None  # existing cluster; None starts an embedded local Ray
    actors: int = 2  # captioner actors (ray engine)
    num_gpus: float = 0.0  # GPUs per actor (ray engine)
    progress: bool = True  # tqdm bar with images/s on stderr


def _validate(config: BulkConfig) -> DecodingOptions:
    for name in ("batch_size", "shard_size", "actors"):
        if getattr(config, name) < 1:
            raise DecodingError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.num_gpus < 0:
        raise DecodingError(f"num_gpus must be >= 0, got {config.num_gpus}")
    try:
        check_formats(config.formats)
    except ValueError as error:
        raise DecodingError(f"formats: {error}") from None
    if config.engine not in ENGINES:
        raise DecodingError(f"unknown engine {config.engine!r}; known: {', '.join(ENGINES)}")
    return config.options.validate(load_config(config.bundle).token_limit)


def caption_dataset(config: BulkConfig) -> dict:
    """Caption every image of `config.source` not yet in `config.out`; returns the manifest written."""
    options = _validate(config)
    listing = list_images(config.source, config.formats)
    refs = listing.refs
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"bundle": str(Path(config.bundle).resolve()), "source": str(Path(config.source).resolve()),
                "backend": config.backend, "options": asdict(options), "embeddings": config.embeddings}
    check_settings(out, settings)
    done = done_ids(out)
    pending = [ref for ref in refs if ref.id not in done]
    arguments = dict(bundle=config.bundle, backend=config.backend, device=config.device, options=options,
                     batch_size=config.batch_size, embeddings=config.embeddings, formats=config.formats)
    if config.engine == "ray":
        from clipcap.bulk.ray_engine import caption_refs_on_ray  # Ray is imported only here

        batches = caption_refs_on_ray(pending, **arguments, address=config.ray_address, actors=config.actors,
                               num_gpus=config.num_gpus)
    else:
        batches = caption_refs(pending, **arguments)
    writer = ShardWriter(out, config.shard_size, config.embeddings)
    captioned = failed = 0
    start = time.perf_counter()

    def manifest(status: str) -> dict:
        seconds = time.perf_counter() - start
        shards = shard_paths(out)
        errors = [e for path in shards for e in pq.read_table(path, columns=["error"]).column("error").to_pylist()]
        return {
            "status": status,
            "settings": settings,
            "engine": config.engine,
            "device": config.device,
            "batch_size": config.batch_size,
            "actors": config.actors if config.engine == "ray" else None,
            "counts": {"images": len(refs), "rows": len(errors), "failed": sum(e is not None for e in errors),
                       "skipped_files": listing.skipped,  # folder files not of an accepted format, by extension
                       "this_run": {"skipped_done": len(done), "captioned": captioned, "failed": failed}},
            # Wall time, model loading (and Ray's start) included: short runs understate the steady rate.
            "timings": {"seconds": round(seconds, 3), "images_per_second": round((captioned + failed) / seconds, 2)},
            "shards": [path.name for path in shards],
        }

    try:
        with tqdm(total=len(pending), unit="img", desc="captioning", disable=not config.progress) as bar:
            for rows in batches:
                writer.add(rows)
                bad = sum(row["error"] is not None for row in rows)
                failed += bad
                captioned += len(rows) - bad
                bar.update(len(rows))
    except KeyboardInterrupt:
        writer.close()  # the rows captioned so far are kept: the same command resumes after them
        result = manifest("interrupted")
        write_manifest(out, result)
        raise Interrupted(result) from None
    writer.close()
    result = manifest("complete")
    write_manifest(out, result)
    return result
