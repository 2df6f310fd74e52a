"""Evaluate a bundle on a caption dataset: caption every image (batched), score, write predictions.

Works on any bundle `Captioner.from_path` opens, so exported bundles are evaluated with the
same code through their backend.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipcap.decoding import DecodingOptions
from clipcap.images import ImageError
from clipcap.training.data import ImageCaptions, read_dataset
from clipcap.training.metrics import caption_scores, exact_match, format_table

PREDICTIONS_FILE = "predictions.json"
SCORES_FILE = "scores.json"


@dataclass
class EvalConfig:
    bundle: Path
    data: Path  # caption file (see clipcap.training.data)
    out: Path  # predictions.json and scores.json are written here
    image_root: Path | None = None  # None: the data file's directory
    format: str = "auto"
    split: str | None = None  # Karpathy split, e.g. test
    limit: int | None = None  # only the first N images
    batch_size: int = 64
    backend: str = "torch"
    device: str = "cpu"
    options: DecodingOptions = field(default_factory=DecodingOptions)
    spice: bool = True  # run SPICE when its models are present


@dataclass
class EvalResult:
    scores: dict[str, float]
    accuracy: dict[str, dict]
    notes: list[str]
    predictions: list[dict]
    failed_images: dict[str, str]

    def table(self) -> str:
        return format_table(self.scores, self.accuracy)


def caption_records(captioner, records: list[ImageCaptions], image_root: Path, options: DecodingOptions,
                    batch_size: int) -> tuple[list[dict], dict[str, str]]:
    """Predictions for every record whose image loads; images that do not are returned with the reason."""
    from tqdm import tqdm

    predictions, failed = [], {}
    for start in tqdm(range(0, len(records), batch_size), desc="captioning", unit="batch"):
        batch, pixels = [], []
        for record in records[start: start + batch_size]:
            try:
                pixels.append(captioner.load_pixels_file(image_root / record.image))
                batch.append(record)
            except ImageError as error:
                failed[record.image] = str(error)
        if not pixels:
            continue
        captions = captioner.caption_pixels(np.stack(pixels), options).captions
        predictions += [{"image": r.image, "prediction": c.caption, "references": r.captions, "group": r.group}
                        for r, c in zip(batch, captions)]
    return predictions, failed


def score_predictions(predictions: list[dict], spice: bool = True) -> tuple[dict, dict, list[str]]:
    """(caption scores, exact-match accuracy, notes) of prediction rows as caption_records writes them."""
    hypotheses = {p["image"]: p["prediction"] for p in predictions}
    references = {p["image"]: p["references"] for p in predictions}
    groups = {p["image"]: p.get("group") for p in predictions}
    scores, notes = caption_scores(hypotheses, references, spice=spice)
    return scores, exact_match(hypotheses, references, groups), notes


def evaluate(config: EvalConfig) -> EvalResult:
    from clipcap.captioner import Captioner

    dataset = read_dataset(config.data, config.format, config.split)
    records = dataset.records[: config.limit] if config.limit else dataset.records
    captioner = Captioner.from_path(config.bundle, config.backend, config.device)
    options = config.options if config.options.max_tokens else config.options.replace(
        max_tokens=captioner.config.max_tokens)
    image_root = config.image_root or config.data.parent
    predictions, failed = caption_records(captioner, records, image_root, options, config.batch_size)
    if not predictions:
        raise ImageError(f"none of the {len(records)} images could be read, e.g. {next(iter(failed.values()))}")
    scores, accuracy, notes = score_predictions(predictions, config.spice)
    if failed:
        notes.append(f"{len(failed)} missing/corrupt image(s) skipped")
    if dataset.report.skipped_rows:
        notes.append(dataset.report.summary())
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / PREDICTIONS_FILE).write_text(json.dumps(predictions, indent=1, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    summary = {"bundle": str(config.bundle), "data": str(config.data), "backend": config.backend,
               "decoding": dataclasses.asdict(options), "images": len(predictions), "scores": scores,
               "exact_match": accuracy, "notes": notes, "failed_images": failed}
    (config.out / SCORES_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return EvalResult(scores, accuracy, notes, predictions, failed)
