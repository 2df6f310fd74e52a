"""Caption dataset readers: COCO Karpathy splits, COCO `captions_*.json`, and JSONL/CSV image-caption pairs.

Every reader returns `ImageCaptions` records (one per unique image, all its captions) and a
`ReadReport` of the rows it had to skip, so a malformed line costs that line and nothing else.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("auto", "karpathy", "coco", "jsonl", "csv")


class DatasetError(ValueError):
    """The dataset file as a whole cannot be read (missing, wrong format); the message says which."""


@dataclass
class ImageCaptions:
    image: str  # path relative to the image root (or absolute)
    captions: list[str]  # every reference caption of the image, in file order
    group: str | None = None  # optional label for per-group scores (the shapes data: one-/two-object)


@dataclass
class ReadReport:
    skipped_rows: list[str] = field(default_factory=list)  # "line 7: no 'caption' field", ...

    def summary(self) -> str:
        return f"{len(self.skipped_rows)} malformed row(s) skipped" + (
            f", e.g. {'; '.join(self.skipped_rows[:3])}" if self.skipped_rows else "")


@dataclass
class Dataset:
    records: list[ImageCaptions]
    report: ReadReport

    def pairs(self) -> list[tuple[str, str]]:
        """(image, caption) training pairs: one per caption."""
        return [(r.image, c) for r in self.records for c in r.captions]


def read_dataset(path: str | Path, format: str = "auto", split: str | None = None) -> Dataset:
    """Read any supported caption file. `split` selects Karpathy splits ('train' includes 'restval')."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    if format == "auto":
        format = _detect_format(path)
    readers = {"karpathy": _read_karpathy, "coco": _read_coco, "jsonl": _read_jsonl, "csv": _read_csv}
    if format not in readers:
        raise DatasetError(f"unknown dataset format {format!r}; known: {', '.join(FORMATS)}")
    if split is not None and format != "karpathy":
        raise DatasetError(f"{path}: --split applies to Karpathy files only, this is {format}")
    report = ReadReport()
    records = readers[format](path, report, split) if format == "karpathy" else readers[format](path, report)
    if not records:
        raise DatasetError(f"{path}: no usable (image, caption) rows; {report.summary()}")
    return Dataset(records, report)


def _detect_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".csv":
        return "csv"
    if path.suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
    raise DatasetError(f"{path}: cannot tell the format from the name/contents; pass one of {', '.join(FORMATS[1:])}")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None


def _group_rows(rows: list[tuple[str, str, str | None]]) -> list[ImageCaptions]:
    """Merge (image, caption, group) rows into one record per image, in order of first appearance."""
    records: dict[str, ImageCaptions] = {}
    for image, caption, group in rows:
        record = records.setdefault(image, ImageCaptions(image, [], group))
        record.captions.append(caption)
    return list(records.values())


def _read_jsonl(path: Path, report: ReadReport) -> list[ImageCaptions]:
    """One JSON object per line: {"image": ..., "caption": "..."} or {"image": ..., "captions": [...]}.

    When a row has both, "captions" (all references) wins; an optional "group" labels the image.
    """
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.skipped_rows.append(f"line {number}: not valid JSON")
            continue
        captions = row.get("captions", [row.get("caption")]) if isinstance(row, dict) else None
        problem = _row_problem(row.get("image") if isinstance(row, dict) else None, captions)
        if problem:
            report.skipped_rows.append(f"line {number}: {problem}")
            continue
        group = row.get("group") if isinstance(row.get("group"), str) else None
        rows += [(row["image"], caption.strip(), group) for caption in captions]
    return _group_rows(rows)


def _read_csv(path: Path, report: ReadReport) -> list[ImageCaptions]:
    """A header row naming `image` and `caption` columns, then one pair per row."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: CSV needs a header with 'image' and 'caption' columns")
        rows = []
        for number, row in enumerate(reader, start=2):
            problem = _row_problem(row.get("image"), [row.get("caption")])
            if problem:
                report.skipped_rows.append(f"line {number}: {problem}")
                continue
            rows.append((row["image"], row["caption"].strip(), row.get("group") or None))
    return _group_rows(rows)


def _row_problem(image, captions) -> str | None:
    if not isinstance(image, str) or not image.strip():
        return "no 'image' path"
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        return "no non-empty 'caption' text"
    return None


def _read_karpathy(path: Path, report: ReadReport, split: str | None) -> list[ImageCaptions]:
    """Karpathy's `dataset_coco.json`: images with filepath/filename/split/sentences[].raw."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy split file (no 'images' list)")
    # As in the paper (and most COCO captioning work), 'restval' images train with 'train'.
    wanted = {"train", "restval"} if split == "train" else None if split is None else {split}
    records = []
    for number, image in enumerate(data["images"]):
        try:
            name = str(Path(image.get("filepath", "")) / image["filename"])
            captions = [s["raw"].strip() for s in image["sentences"] if s["raw"].strip()]
        except (KeyError, TypeError, AttributeError):
            report.skipped_rows.append(f"images[{number}]: missing filename or sentences[].raw")
            continue
        if wanted is not None and image.get("split") not in wanted:
            continue
        if captions:
            records.append(ImageCaptions(name, captions))
        else:
            report.skipped_rows.append(f"images[{number}]: no captions")
    return records


def _read_coco(path: Path, report: ReadReport) -> list[ImageCaptions]:
    """COCO `captions_{train,val}2014.json`: images[].file_name joined to annotations[].caption by id."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DatasetError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    files = {}
    for number, image in enumerate(data["images"]):
        if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str):
            files[image["id"]] = image["file_name"]
        else:
            report.skipped_rows.append(f"images[{number}]: missing id or file_name")
    rows = []
    for number, annotation in enumerate(data["annotations"]):
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in files or not isinstance(caption, str) or not caption.strip():
            report.skipped_rows.append(f"annotations[{number}]: unknown image_id or empty caption")
            continue
        rows.append((files[image_id], caption.strip(), None))
    return _group_rows(rows)
