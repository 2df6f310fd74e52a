"""Compare the newest benchmark record with the previous one on this machine, change by change against the noise.

    python benchmarks/check.py                          # report every metric's change
    python benchmarks/check.py --fail-on-regression     # ... and exit 1 when one regressed

A change is a regression when it goes the wrong way by more than --z combined standard errors (each
run's own, from its iterations) and by more than --min-change. Absolute numbers are compared on one
machine fingerprint only; ratios also against another machine when this one has a single record.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.history import HISTORY_DIR, load_records
from clipcap_bench.machine import fingerprint, machine_info
from clipcap_bench.regression import CheckConfig, changes_markdown, compare, newest_pair

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    defaults = CheckConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=Path, default=ROOT / HISTORY_DIR, help="directory of records")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--kinds", default="latency,serving", help="which runs to check")
    parser.add_argument("--fingerprint", help="machine fingerprint to check (default: this machine's)")
    parser.add_argument("--z", type=float, default=defaults.z, help="standard errors a real change exceeds")
    parser.add_argument("--min-change", type=float, default=defaults.min_change,
                        help="relative change a real change exceeds (drift between runs)")
    parser.add_argument("--ratios-only", action="store_true",
                        help="judge only ratios (a shared machine, where absolute numbers move with the neighbours)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a metric regressed")
    args = parser.parse_args(argv)
    machine = args.fingerprint or fingerprint(machine_info())
    records = load_records(args.history)
    regressions = 0
    for kind in [k for k in args.kinds.split(",") if k]:
        previous, newest = newest_pair(records, machine, kind, args.profile)
        if newest is None or previous is None:
            print(f"{kind} ({args.profile}): fewer than two records to compare for machine {machine}")
            continue
        changes = compare(previous, newest, CheckConfig(z=args.z, min_change=args.min_change, ratios_only=args.ratios_only))
        print(changes_markdown(previous, newest, changes))
        regressions += sum(c.verdict == "regression" for c in changes)
    print(f"{regressions} regression(s)")
    return 1 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
    sys.exit(main())
