"""Train a ClipCap model on a feature directory (from extract_features.py); write a model bundle.

    # the paper's MLP variant (pretrained GPT-2 fine-tuned), paper defaults
    python training/train.py --features build/features/coco-train --out build/runs/mlp
    # the Transformer variant (GPT-2 frozen, only the mapper trained)
    python training/train.py --features build/features/coco-train --mapper transformer \
        --mapper-layers 8 --normalize-prefix --out build/runs/transformer
    # offline: a small randomly initialised GPT-2 (sizes by --gpt2-layers, ...), a BPE of the captions
    python training/train.py --features build/shapes-features --gpt2 random --gpt2-layers 2 --gpt2-embd 64 \
        --gpt2-heads 2 --out build/shapes-model
    # continue an interrupted run
    python training/train.py --out build/runs/mlp --resume build/runs/mlp/checkpoints/epoch-003.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.mappers import MAPPERS
from clipcap.training.data import DatasetError
from clipcap.training.trainer import RANDOM_GPT2, TrainConfig, train

RANDOM_SIZES = ("gpt2_layers", "gpt2_embd", "gpt2_heads", "gpt2_positions", "bpe_vocab_size")  # --gpt2 random only


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, help="feature directory (required unless --resume)")
    parser.add_argument("--out", type=Path, required=True, help="bundle + metrics.json + loss.png + checkpoints/")
    parser.add_argument("--val-features", type=Path, help="separate validation feature directory")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help="images held out for validation when no --val-features")
    model = parser.add_argument_group("model")
    model.add_argument("--mapper", choices=sorted(MAPPERS), default=d.mapper)
    model.add_argument("--prefix-length", type=int, default=d.prefix_length)
    model.add_argument("--clip-length", type=int, default=d.clip_length)
    model.add_argument("--mapper-layers", type=int, default=d.mapper_layers)
    model.add_argument("--normalize-prefix", action="store_true")
    model.add_argument("--gpt2", default=d.gpt2,
                       help="pretrained GPT-2-family model (any language): a hub name (local cache first) or a local "
                            f"folder with its config, weights and tokenizer files; '{RANDOM_GPT2}': random init of the "
                            f"sizes below, with a BPE trained on the captions (default: {d.gpt2}, as the paper)")
    # The sizes default to None, so one given without --gpt2 random (which alone reads them) is refused.
    model.add_argument("--gpt2-layers", type=int, help=f"--gpt2 {RANDOM_GPT2} only (default: {d.gpt2_layers})")
    model.add_argument("--gpt2-embd", type=int, help=f"--gpt2 {RANDOM_GPT2} only (default: {d.gpt2_embd})")
    model.add_argument("--gpt2-heads", type=int, help=f"--gpt2 {RANDOM_GPT2} only (default: {d.gpt2_heads})")
    model.add_argument("--gpt2-positions", type=int, help=f"--gpt2 {RANDOM_GPT2} only (default: {d.gpt2_positions})")
    model.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: GPT-2's, or a BPE trained on the captions)")
    model.add_argument("--bpe-vocab-size", type=int, help=f"--gpt2 {RANDOM_GPT2} only (default: {d.bpe_vocab_size})")
    model.add_argument("--train-clip", action="store_true", help="also update the CLIP tower with the caption loss")
    model.add_argument("--train-clip-layers", type=int,
                       help="with --train-clip: only the last N ViT blocks (+ final norm, projection) learn")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=d.epochs)
    optim.add_argument("--batch-size", type=int, default=d.batch_size)
    optim.add_argument("--lr", type=float, default=d.lr)
    optim.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay)
    optim.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA too")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from (its settings are used)")
    args = parser.parse_args(argv)
    if args.features is None and args.resume is None:
        parser.error("--features is required (unless --resume)")
    given = [name for name in RANDOM_SIZES if getattr(args, name) is not None]
    if given and args.gpt2 != RANDOM_GPT2:
        parser.error(f"--{given[0].replace('_', '-')} sizes a random GPT-2: it needs --gpt2 {RANDOM_GPT2} "
                     f"(--gpt2 {args.gpt2} brings its own sizes and tokenizer)")
    settings = {k: v for k, v in vars(args).items() if k != "features" and v is not None}
    config = TrainConfig(**settings, features=args.features or Path())
    try:
        result = train(config)
        print(f"model bundle written to {result.bundle}")
    except (BundleError, DatasetError) as error:  # a user's input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
