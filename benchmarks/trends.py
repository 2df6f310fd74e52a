"""Draw the benchmark history: per metric, one line per machine fingerprint, commits on the x axis.

    python benchmarks/trends.py                    # quick profile -> build/bench/trends/*.png, index.html, summary.md
    python benchmarks/trends.py --profile full --out build/bench/trends-full
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.history import HISTORY_DIR, load_records
from clipcap_bench.trends import plot_trends

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=Path, default=ROOT / HISTORY_DIR, help="directory of records")
    parser.add_argument("--profile", default="quick", help="which profile's records to draw")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "trends",
                        help="output directory (the committed plots: --out benchmarks/results/trends)")
    args = parser.parse_args(argv)
    try:
        written = plot_trends(load_records(args.history), args.out, args.profile)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
