"""The scheduler profile: today's static batches against the CaptionEngine, one bundle, one process.

    python benchmarks/engine.py                                   # the demo model
    python benchmarks/engine.py --make-full-size build/bench/full-size --full-size onnx-int8-encoder \
        --rates 0.5,1,2,3,4,5 --duration 30 --record

Open-loop Poisson arrivals of a mixed workload (greedy up to 20 tokens, some beam-5 up to 67; small PNGs
and 12 MP JPEGs) at each rate, both arms on the same arrivals (clipcap_bench.engine_profile). Writes
engine.json/.md/.png to --out; --record adds the run to benchmarks/history/ (profile "engine").
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipcap_bench.engine_profile import EngineProfileConfig, run_engine_profile, write_engine_outputs
from clipcap_bench.history import record_report

ROOT = Path(__file__).resolve().parent.parent


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    defaults = EngineProfileConfig(bundle="models/shapes-demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "shapes-demo", help="any model or export bundle")
    parser.add_argument("--make-full-size", type=Path, metavar="DIR",
                        help="build (once) ViT-B-32 + GPT-2 small with random weights and its exports in DIR; "
                             "measure --full-size instead of --bundle (minutes, 5.5 GiB peak)")
    parser.add_argument("--full-size", default="onnx-int8-encoder", help="which full-size bundle (see --make-full-size)")
    parser.add_argument("--rates", type=_floats, default=defaults.rates, help="offered requests/s, e.g. 1,2,4")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds of arrivals per arm and rate")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="compute threads, both arms")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "engine")
    parser.add_argument("--record", action="store_true", help="add the run to benchmarks/history/ (profile engine)")
    parser.add_argument("--note", default="", help="a remark stored with the record")
    args = parser.parse_args(argv)
    bundle = args.bundle
    if args.make_full_size is not None:
        from clipcap_bench.bundles import make_full_size_bundles

        bundle = make_full_size_bundles(args.make_full_size)[args.full_size]
    report = run_engine_profile(EngineProfileConfig(bundle=str(bundle), rates=args.rates, duration_s=args.duration,
                                                    threads=args.threads))
    written = write_engine_outputs(report, args.out)
    if args.record:
        written.append(record_report(report, "engine", ROOT, note=args.note))
    print((args.out / "engine.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
