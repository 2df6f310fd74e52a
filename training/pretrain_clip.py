"""Contrastive pretraining of a tiny open_clip CLIP on synthetic shapes (clipcap.training.clip_pretraining).

    python training/pretrain_clip.py --out build/demo/clip --steps 2000

Writes open_clip_config.json, preprocess_cfg.json, clip.safetensors, clip_visual.safetensors,
metrics.json and loss.png into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipcap.training.clip_pretraining import ClipPretrainConfig, train

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes-clip.json"


def main(argv: list[str] | None = None) -> dict:
    d = ClipPretrainConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=DEFAULT_MODEL_CONFIG, help="open_clip CLIP(**cfg) JSON")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=d.hard_negatives)
    parser.add_argument("--n-images", type=int, default=d.n_images, help="training images generated in memory")
    parser.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out images for metrics.json")
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--threads", type=int, default=d.threads)
    args = parser.parse_args(argv)
    cfg = ClipPretrainConfig(
        out=args.out,
        model_config=args.config,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_steps, args.steps),
        seed=args.seed,
        hard_negatives=args.hard_negatives,
        n_images=args.n_images,
        n_eval=args.n_eval,
        log_every=args.log_every,
        threads=args.threads,
    )
    metrics = train(cfg)
    print(json.dumps(metrics["eval"], indent=2))
    return metrics


if __name__ == "__main__":
    main()
