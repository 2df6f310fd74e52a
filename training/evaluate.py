"""Caption a dataset split with a bundle and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE if present).

    python training/evaluate.py models/shapes-demo --data build/demo/eval/captions.jsonl --out build/eval/demo
    python training/evaluate.py build/runs/mlp --data dataset_coco.json --split test --image-root coco/ \
        --decoding beam --out build/eval/mlp
    python training/evaluate.py build/export/mlp --backend onnxruntime --data ... --out ...

Writes OUT/predictions.json and OUT/scores.json and prints a table. Exact-match accuracy is
reported overall and per group when the data names groups (the shapes data does).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipcap.decoding import STRATEGIES, DecodingOptions
from clipcap.training.data import FORMATS
from clipcap.training.evaluation import EvalConfig, evaluate


def main(argv: list[str] | None = None) -> None:
    d, o = EvalConfig, DecodingOptions
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="model bundle or export bundle")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="predictions.json and scores.json go here")
    parser.add_argument("--image-root", type=Path, help="default: the data file's folder")
    parser.add_argument("--format", choices=FORMATS, default=d.format)
    parser.add_argument("--split", help="Karpathy split, e.g. test")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--backend", default=d.backend)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--decoding", choices=STRATEGIES, default=o.strategy)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--beam-size", type=int, default=o.beam_size)
    parser.add_argument("--top-p", type=float, default=o.top_p)
    parser.add_argument("--temperature", type=float, default=o.temperature)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-spice", dest="spice", action="store_false", help="skip SPICE even if available")
    args = parser.parse_args(argv)
    options = DecodingOptions(strategy=args.decoding, max_tokens=args.max_tokens, beam_size=args.beam_size,
                              top_p=args.top_p, temperature=args.temperature, seed=args.seed)
    result = evaluate(EvalConfig(
        bundle=args.bundle, data=args.data, out=args.out, image_root=args.image_root, format=args.format,
        split=args.split, limit=args.limit, batch_size=args.batch_size, backend=args.backend, device=args.device,
        options=options, spice=args.spice,
    ))
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"predictions and scores written to {args.out}")


if __name__ == "__main__":
    main()
