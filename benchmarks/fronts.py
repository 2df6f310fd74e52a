"""TorchServe and Ray Serve side by side on one bundle and this machine: req/s, p50/p99 per level, worker memory.

    python benchmarks/fronts.py --bundle models/shapes-demo --rates 5,10,20,40 --duration 15 \
        --images samples/*.png --out benchmarks/results/fronts

Starts both servers on free loopback ports (TorchServe with one worker, Ray Serve with one replica,
the same batching from serving/model-config.yaml), loads both at each offered rate with Poisson
arrivals (open loop), the front that goes first alternating, stops both. Writes fronts.json, fronts.md and fronts.png to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.fronts import FrontsConfig, compare_fronts, write_outputs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = FrontsConfig(bundle=Path(), repo=ROOT)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in defaults.rates), help="offered req/s, e.g. 5,10,20")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds per front and rate")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per worker / replica")
    parser.add_argument("--p99-objective", type=float, default=defaults.p99_objective_ms, help="ms")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="default: 4 synthetic 640x480 JPEGs")
    parser.add_argument("--work-dir", type=Path, default=defaults.work_dir)
    parser.add_argument("--out", type=Path, default=Path("build/bench/fronts"))
    args = parser.parse_args(argv)
    config = FrontsConfig(bundle=args.bundle.resolve(), repo=ROOT, work_dir=args.work_dir.resolve(),
                          rates=[float(v) for v in args.rates.split(",") if v], duration_s=args.duration,
                          threads=args.threads,
                          p99_objective_ms=args.p99_objective, images=args.images)
    try:
        report = compare_fronts(config)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_outputs(report, args.out)
    print((args.out / "fronts.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
