"""A bounded load test of a running TorchServe on loopback: req/s and latency p50/p90/p99 per model and concurrency.

    python benchmarks/serving.py --url http://127.0.0.1:8080 --management-url http://127.0.0.1:8081 \\
        --models clipcap-torch,clipcap-onnx --concurrency 1,8 --requests 200 --duration 60 \\
        --key-file key_file.json --images samples/*.png

Models are loaded in turn (alternating between rounds, so a noisy neighbour hits each alike); each
(model, concurrency) block stops at --requests or --duration, whichever comes first. The tokens are
read from TorchServe's key_file.json (never from the command line) and never written out; with
--management-url each model's batch size, batch delay and workers are recorded. Only loopback
targets are accepted. Writes serving.json, serving.md and serving.png to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.history import record_report
from clipcap_bench.load import ServingLoadConfig, read_api_keys, run_serving_load
from clipcap_bench.report import write_serving_outputs

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose commit a record names


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    defaults = ServingLoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=defaults.url, help="TorchServe inference address (loopback only)")
    parser.add_argument("--management-url", help="TorchServe management address: record each model's settings")
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated model names")
    parser.add_argument("--concurrency", type=_int_list, default=defaults.concurrency, help="e.g. 1,8")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="per model and concurrency level")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds cap per model and level")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds per level, models alternating")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="requests per model, not counted")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="default: 4 synthetic 640x480 JPEGs")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="TorchServe's key_file.json (its inference and management keys are the Bearer tokens)")
    parser.add_argument("--no-token", action="store_true", help="the server runs with --disable-token-auth")
    parser.add_argument("--out", type=Path, default=Path("build/bench/serving"), help="output directory")
    parser.add_argument("--record", metavar="PROFILE",
                        help="also add the run to benchmarks/history/ under this profile name (e.g. full)")
    parser.add_argument("--note", default="", help="a remark stored with the record (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    config = ServingLoadConfig(url=args.url, models=[m for m in args.models.split(",") if m],
                               concurrency=args.concurrency, requests=args.requests, duration_s=args.duration,
                               rounds=args.rounds, warmup=args.warmup, timeout_s=args.timeout, images=args.images,
                               management_url=args.management_url)
    try:
        config.validate()
        keys = None if args.no_token else read_api_keys(args.key_file)
        report = run_serving_load(config, keys)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_serving_outputs(report, args.out)
    print((args.out / "serving.md").read_text())
    if args.record:
        written.append(record_report(report, args.record, ROOT, note=args.note))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
