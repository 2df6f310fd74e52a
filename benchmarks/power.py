"""Measure the paired check's false-alarm rate and power on this machine, for real (run it on a quiet machine).

    python benchmarks/power.py --reruns 40     # 40 A/A checks, 40 with a planted 25% slowdown

Each rerun is a whole check (benchmarks/check.py's design: --rounds paired rounds, the signed-rank
test) of the working tree against itself: once unchanged (a flag is a false alarm) and once with
every runtime call of the new arm made 25% slower (a flag is a catch). The two workers stay up
across reruns. Prints both rates with 95% intervals next to what the noise model fitted to this
machine's recorded rounds predicts; writes build/bench/power/power.json. Peaks at 2.3 GiB of memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from clipcap_bench.ab import ABConfig, judge_rounds, paired_workers, run_paired
from clipcap_bench.history import HISTORY_DIR, load_records
from clipcap_bench.noise import fit_noise, flag_rate
from clipcap_bench.paired import PairedTest

ROOT = Path(__file__).resolve().parent.parent


def wilson(flags: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a rate measured as flags / n."""
    centre, spread = flags + z * z / 2, z * math.sqrt(flags * (n - flags) / n + z * z / 4)
    return max(0.0, (centre - spread) / (n + z * z)), min(1.0, (centre + spread) / (n + z * z))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=40, help="checks per condition (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=ABConfig().rounds, help="paired rounds per check")
    parser.add_argument("--slowdown", type=float, default=1.25, help="the planted slowdown (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "power")
    args = parser.parse_args(argv)
    test, results = PairedTest(), {}
    for slowdown in (1.0, args.slowdown):
        config = ABConfig(rounds=args.rounds, rerun=True, slowdown=slowdown)
        flags = 0
        with paired_workers(config, ROOT) as (workers, _):
            for _ in tqdm(range(args.reruns), desc=f"checks, slowdown {slowdown:g}", unit="check"):
                verdicts = judge_rounds(run_paired(workers, config.rounds, progress=False), test)
                flags += any(v.metric == "e2e" and v.verdict == "regression" for v in verdicts)
        results[slowdown] = {"flagged": flags, "reruns": args.reruns, "interval": wilson(flags, args.reruns)}
    noise = fit_noise(load_records(ROOT / HISTORY_DIR))
    for slowdown, result in results.items():
        result["simulated"] = flag_rate(noise, args.rounds, slowdown, reruns=2000, test=test)
        low, high = result["interval"]
        print(f"slowdown {slowdown:g}: e2e flagged in {result['flagged']} of {result['reruns']} checks "
              f"({result['flagged'] / result['reruns']:.0%}, 95% interval {low:.0%}-{high:.0%}); the noise model of "
              f"{noise.source} predicts {result['simulated']:.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "power.json").write_text(json.dumps(
        {"results": {str(k): v for k, v in results.items()}, "test": dataclasses.asdict(test), "rounds": args.rounds,
         "load_average": list(os.getloadavg())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
