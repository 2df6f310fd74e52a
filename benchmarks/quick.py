"""The quick profile (a few minutes on 2 cores, for every change): demo-model latency of four backends
side by side, and a private TorchServe serving the demo model at two concurrency levels.

    python benchmarks/quick.py --record            # what `make bench` runs
    python benchmarks/quick.py --no-serve          # latency only (no Java needed)

Writes latency.* and serving.* to --out; with --record also adds both runs to benchmarks/history/
(then `python benchmarks/trends.py` draws them and `python benchmarks/check.py` compares them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clipcap_bench.history import record_report
from clipcap_bench.profiles import QuickProfile, run_quick_latency, run_quick_serving
from clipcap_bench.report import write_latency_outputs, write_serving_outputs

ROOT = Path(__file__).resolve().parent.parent  # the checkout measured, whose commit a record names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "quick" / "results")
    parser.add_argument("--no-serve", action="store_true", help="skip the TorchServe load run")
    parser.add_argument("--record", action="store_true", help="add the runs to benchmarks/history/ (profile quick)")
    parser.add_argument("--history", type=Path, default=None, help="another history directory")
    parser.add_argument("--note", default="", help="a remark stored with the records (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    profile = QuickProfile(serve=not args.no_serve)
    start = time.monotonic()
    reports = [run_quick_latency(profile, ROOT)]
    written = write_latency_outputs(reports[0], args.out)
    if profile.serve:
        reports.append(run_quick_serving(profile, ROOT))
        written += write_serving_outputs(reports[1], args.out)
    print((args.out / "latency.md").read_text())
    if profile.serve:
        print((args.out / "serving.md").read_text())
    if args.record:
        written += [record_report(r, "quick", ROOT, args.history, args.note) for r in reports]
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"quick profile: {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
