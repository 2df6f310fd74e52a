"""Write the synthetic shapes data set (or a few demo samples) to a directory.

    python training/shapes.py --out DIR --n 2000 --seed 0
    python training/shapes.py --out samples --n 8 --seed 77 --samples

The generator and its spec are clipcap.training.shapes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipcap.training.shapes import WriteConfig, write_dataset, write_samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=WriteConfig.n)
    parser.add_argument("--seed", type=int, default=WriteConfig.seed)
    parser.add_argument("--samples", action="store_true", help="demo layout: NAME.png + captions.json")
    args = parser.parse_args(argv)
    config = WriteConfig(out=args.out, n=args.n, seed=args.seed)
    if args.samples:
        write_samples(config)
    else:
        write_dataset(config)


if __name__ == "__main__":
    main()
