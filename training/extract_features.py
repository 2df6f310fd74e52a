"""Encode every unique image of a caption dataset once with a frozen CLIP tower; save embeddings + index.

    python training/extract_features.py --data dataset_coco.json --split train --image-root coco/ \
        --clip-model ViT-B-32 --clip-pretrained openai --out build/features/coco-train
    python training/extract_features.py --data pairs.jsonl --image-root my_images/ \
        --clip-bundle models/shapes-demo --out build/features/mine

Re-running with the same --out resumes: images already embedded are skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.training.data import FORMATS, DatasetError
from clipcap.training.features import ClipSource, ExtractConfig, extract_features


def main(argv: list[str] | None = None) -> int:
    d = ExtractConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="dataset_coco.json (Karpathy), captions_*.json (COCO), or .jsonl/.csv image,caption pairs")
    parser.add_argument("--image-root", type=Path, help="image paths are relative to this (default: the data file's folder)")
    parser.add_argument("--out", type=Path, required=True, help="feature directory (resumed if it exists)")
    parser.add_argument("--format", choices=FORMATS, default=d.format)
    parser.add_argument("--split", help="Karpathy split: train (includes restval), val or test")
    tower = parser.add_argument_group("CLIP image tower (a bundle's, or an open_clip model)")
    tower.add_argument("--clip-bundle", type=Path, help="use this model bundle's CLIP tower")
    tower.add_argument("--clip-model", help="open_clip architecture name or JSON model config")
    tower.add_argument("--clip-pretrained", help="open_clip weights: a tag, e.g. openai (local Hugging Face cache "
                       "first), or a weights file")
    tower.add_argument("--clip-weights", type=Path, help="safetensors weights of the visual tower")
    tower.add_argument("--clip-preprocess", type=Path, help="preprocess_cfg.json from training/pretrain_clip.py")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--part-size", type=int, default=d.part_size, help="images per saved part")
    parser.add_argument("--device", default=d.device)
    args = parser.parse_args(argv)
    if (args.clip_bundle is None) == (args.clip_model is None):
        parser.error("give exactly one of --clip-bundle or --clip-model")
    config = ExtractConfig(
        data=args.data, image_root=args.image_root or args.data.parent, out=args.out, format=args.format,
        split=args.split, batch_size=args.batch_size, part_size=args.part_size, device=args.device,
        clip=ClipSource(bundle=args.clip_bundle, model=args.clip_model, pretrained=args.clip_pretrained,
                        weights=args.clip_weights, preprocess=args.clip_preprocess),
    )
    try:
        report = extract_features(config)
        print(report.summary())
    except (BundleError, DatasetError) as error:  # a user's input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
