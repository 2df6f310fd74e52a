"""The CLIP feature cache: the frozen image tower run once per unique image, embeddings saved with an index.

The paper's `parse_coco.py` encodes every image once per caption (five times on COCO); here each
image is encoded once, in batches, and the work is saved in parts so an interrupted run resumes
where it stopped. The cache also keeps the tower's config and weights, so training builds its
model around exactly the tower that produced the features (and `--train-clip` starts from it).

Layout of a feature directory:
    index.json             image root, embed size, parts (file + image list), images that failed
    captions.jsonl         the dataset's records: {"image", "captions", "group"}
    part-00000.safetensors {"embeddings": (n, embed_dim) float32}, rows in the order of its image list
    clip.json              the ClipConfig of the tower (the bundle's "clip" section)
    clip_visual.safetensors the tower's weights
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipcap.config import BundleError, ClipConfig
from clipcap.images import ImageError, load_pixels_file
from clipcap.training.data import Dataset, ImageCaptions, read_dataset

INDEX_FILE = "index.json"
CAPTIONS_FILE = "captions.jsonl"
CLIP_CONFIG_FILE = "clip.json"
CLIP_WEIGHTS_FILE = "clip_visual.safetensors"


@dataclass
class ClipSource:
    """Where the CLIP image tower comes from: a model bundle, or an open_clip model (+ weights)."""

    bundle: Path | None = None  # take the tower (and its preprocessing) from this model bundle
    model: str | None = None  # open_clip architecture name ('ViT-B-32') or a JSON model-config file
    pretrained: str | None = None  # open_clip weights: a tag ('openai', resolved by clipcap.hub) or a file
    weights: Path | None = None  # a safetensors state dict of the visual tower (e.g. from pretrain_clip.py)
    preprocess: Path | None = None  # pretrain_clip.py's preprocess_cfg.json: image size, mean, std

    def describe(self) -> str:
        return str(self.bundle) if self.bundle else f"{self.model} ({self.pretrained or self.weights or 'random'})"


def load_clip_tower(source: ClipSource) -> tuple[ClipConfig, nn.Module]:
    """The ClipConfig and the open_clip visual tower for `source`, weights loaded with strict checks."""
    from clipcap.formats.model_bundle import check_state_dict, load_bundle
    from clipcap.model import build_clip_visual, pretrained_clip_tower, resolve_clip_config

    if source.bundle is not None:
        bundle = load_bundle(source.bundle)
        return bundle.config.clip, bundle.model.clip
    if source.model is None:
        raise BundleError("no CLIP tower given: name a model bundle, or an open_clip model / JSON config")
    if source.pretrained is not None:
        config, tower = pretrained_clip_tower(source.model, source.pretrained)
    else:
        config = resolve_clip_config(source.model)
        tower = build_clip_visual(config)
    if source.preprocess is not None:
        config = _with_preprocessing(config, source.preprocess)
    if source.weights is not None:
        from safetensors.torch import load_file

        if not Path(source.weights).is_file():
            raise BundleError(f"{source.weights}: CLIP weights file not found")
        state = load_file(str(source.weights))
        check_state_dict(tower, state, str(source.weights))
        tower.load_state_dict(state, strict=True)
    return config, tower.eval()


def _with_preprocessing(config: ClipConfig, path: Path) -> ClipConfig:
    """Adopt the image size / mean / std CLIP was trained with, refusing what preprocess() cannot do."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: preprocessing config not found")
    pre = json.loads(path.read_text())
    # clipcap.images.preprocess resizes the shorter side bicubic then centre-crops; nothing else.
    if pre.get("interpolation", "bicubic") != "bicubic" or pre.get("resize_mode", "shortest") != "shortest":
        raise BundleError(f"{path}: only bicubic, shortest-side resizing is supported, got "
                          f"{pre.get('interpolation')!r} / {pre.get('resize_mode')!r}")
    if int(pre["image_size"]) != config.image_size:
        raise BundleError(f"{path}: image_size {pre['image_size']} differs from the model's {config.image_size}")
    return dataclasses.replace(config, mean=[float(v) for v in pre["mean"]], std=[float(v) for v in pre["std"]])


@dataclass
class ExtractConfig:
    data: Path  # a caption file (see clipcap.training.data)
    image_root: Path  # image paths in the data file are relative to this
    out: Path  # the feature directory (created; resumed when it already holds parts)
    clip: ClipSource
    format: str = "auto"
    split: str | None = None  # Karpathy split: train (with restval) | val | test
    batch_size: int = 64  # images per tower call
    part_size: int = 1024  # images per saved part: the most an interruption can cost
    device: str = "cpu"


@dataclass
class ExtractReport:
    embedded: int = 0  # images encoded in this run
    reused: int = 0  # images already in the cache (resume)
    failed: dict[str, str] = field(default_factory=dict)  # image -> why it was skipped
    skipped_rows: int = 0  # malformed rows in the data file

    def summary(self) -> str:
        text = (f"{self.embedded} image(s) embedded, {self.reused} already cached, "
                f"{len(self.failed)} missing/corrupt image(s) skipped, {self.skipped_rows} malformed row(s) skipped")
        if self.failed:
            text += "; e.g. " + "; ".join(self.failed[k] for k in list(self.failed)[:3])
        return text


def extract_features(config: ExtractConfig) -> ExtractReport:
    from safetensors.torch import save_file, save_model
    from tqdm import tqdm

    dataset = read_dataset(config.data, config.format, config.split)
    config.out.mkdir(parents=True, exist_ok=True)
    clip_config, tower = load_clip_tower(config.clip)
    index = _start_index(config, clip_config, tower)
    if not (config.out / CLIP_WEIGHTS_FILE).is_file():
        save_model(tower, str(config.out / CLIP_WEIGHTS_FILE))
    _write_captions(config.out, dataset)

    done = {image for part in index["parts"] for image in part["images"]}
    todo = list(dict.fromkeys(r.image for r in dataset.records if r.image not in done))
    report = ExtractReport(reused=len({r.image for r in dataset.records} & done),
                           skipped_rows=len(dataset.report.skipped_rows))
    tower = tower.to(config.device).eval()
    progress = tqdm(total=len(todo), desc="extract features", unit="img")
    for start in range(0, len(todo), config.part_size):
        images, rows = [], []
        for batch_start in range(start, min(start + config.part_size, len(todo)), config.batch_size):
            names = todo[batch_start: min(batch_start + config.batch_size, start + config.part_size, len(todo))]
            loaded = _load_pixels(config.image_root, names, clip_config, report)
            if loaded:
                pixels = torch.from_numpy(np.stack([row for _, row in loaded]))
                with torch.inference_mode():
                    rows.append(tower(pixels.to(config.device)).float().cpu())
                images += [name for name, _ in loaded]
            progress.update(len(names))
        if images:
            part = f"part-{len(index['parts']):05d}.safetensors"
            save_file({"embeddings": torch.cat(rows).contiguous()}, str(config.out / part))
            index["parts"].append({"file": part, "images": images})
            report.embedded += len(images)
        index["failed"] = report.failed
        _write_json(config.out / INDEX_FILE, index)  # after the part: the index never names a missing file
    progress.close()
    index["failed"] = report.failed
    _write_json(config.out / INDEX_FILE, index)
    return report


def _start_index(config: ExtractConfig, clip_config: ClipConfig, tower: nn.Module) -> dict:
    """The existing index (resume), after checking it was made with the same tower; else a new one."""
    from safetensors.torch import load_file

    clip_file = config.out / CLIP_CONFIG_FILE
    clip_dict = dataclasses.asdict(clip_config)
    if (config.out / INDEX_FILE).is_file():
        saved = load_file(str(config.out / CLIP_WEIGHTS_FILE))
        state = tower.state_dict()
        same_weights = saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
        if json.loads(clip_file.read_text()) != clip_dict or not same_weights:
            raise BundleError(f"{config.out}: holds features of another CLIP tower (config or weights differ "
                              f"from {clip_file.name} / {CLIP_WEIGHTS_FILE}); use a new output directory")
        return json.loads((config.out / INDEX_FILE).read_text())
    _write_json(clip_file, clip_dict)
    return {"image_root": str(config.image_root.resolve()), "embed_dim": clip_config.embed_dim, "parts": [],
            "failed": {}}


def _load_pixels(root: Path, names: list[str], clip: ClipConfig, report: ExtractReport,
                 ) -> list[tuple[str, torch.Tensor]]:
    loaded = []
    for name in names:
        try:
            loaded.append((name, load_pixels_file(root / name, clip.image_size, clip.mean, clip.std)))
        except ImageError as error:
            report.failed[name] = str(error)
    return loaded


def _write_captions(out: Path, dataset: Dataset) -> None:
    lines = [json.dumps({"image": r.image, "captions": r.captions, "group": r.group}) for r in dataset.records]
    (out / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(path)  # atomic: a crash leaves the old index or the new one, never half of one


@dataclass
class FeatureSet:
    """A loaded feature directory: records whose image was embedded, and their embeddings."""

    path: Path
    clip: ClipConfig
    image_root: Path
    records: list[ImageCaptions]
    embeddings: torch.Tensor  # (len(records), embed_dim), row i belongs to records[i]

    def clip_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / CLIP_WEIGHTS_FILE))


def load_features(path: str | Path) -> FeatureSet:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise BundleError(f"{path}: not a feature directory (no {INDEX_FILE}); run training/extract_features.py")
    index = json.loads((path / INDEX_FILE).read_text())
    clip = ClipConfig(**json.loads((path / CLIP_CONFIG_FILE).read_text()))
    clip.validate(str(path / CLIP_CONFIG_FILE))
    row_of, parts = {}, []
    for part in index["parts"]:
        embeddings = load_file(str(path / part["file"]))["embeddings"]
        for i, image in enumerate(part["images"]):
            row_of[image] = (len(parts), i)
        parts.append(embeddings)
    records = []
    for line in (path / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["image"] in row_of:  # images that failed to load have no embedding and drop out here
            records.append(ImageCaptions(row["image"], row["captions"], row.get("group")))
    if not records:
        raise BundleError(f"{path}: no embedded images")
    embeddings = torch.stack([parts[p][i] for p, i in (row_of[r.image] for r in records)])
    return FeatureSet(path, clip, Path(index["image_root"]), records, embeddings)
