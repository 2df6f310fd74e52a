"""Regenerate the summary tables in benchmarks/results/ (index.md, latency-summary.md, capacity.md) from the
committed reports there; the READMEs link to them instead of pasting figures.

    python benchmarks/tables.py            # rewrite them
    python benchmarks/tables.py --check    # exit 1, naming each, when one differs from what the reports give
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.tables import stale_tables, write_tables

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="the folder of committed reports, where the tables are written")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_tables(args.results)
        for name in stale:
            print(f"stale: {args.results / name} (run python benchmarks/tables.py)", file=sys.stderr)
        return 1 if stale else 0
    print("wrote " + ", ".join(str(path) for path in write_tables(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
