"""One caption request end to end, per stage: a 12 MP phone JPEG -> caption, today's path against the best options.

    python benchmarks/request.py --make-full-size build/bench/full-size --record request
    python benchmarks/request.py --bundles build/bench/full-size --options today,int8-encoder --rounds 5

In process (no HTTP), batch 1, exactly --tokens tokens; bytes -> pixels, encoder and token decoding
timed for every option, the options interleaved round-robin in one run (clipcap_bench.request_profile).
--bundles is a directory in make_full_size_bundles' layout (onnx-int8, onnx-int8-encoder, ...).
Writes request.json, request.md and request.png to --out and prints the Markdown; with --record adds
the run to benchmarks/history/ under that profile name.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clipcap_bench.bundles import make_full_size_bundles
from clipcap_bench.history import record_report
from clipcap_bench.request_profile import OPTIONS, RequestProfile, run_request_profile, write_request_outputs
from clipcap.cli import USER_ERRORS

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose commit a record names


def main(argv: list[str] | None = None) -> int:
    defaults = RequestProfile(bundles=Path())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundles", type=Path, metavar="DIR", help="a directory holding the options' bundles")
    where.add_argument("--make-full-size", type=Path, metavar="DIR",
                       help="build (once) ViT-B-32 + GPT-2 small with random weights, its ONNX export and quantised "
                            "siblings in DIR, and measure them")
    parser.add_argument("--options", default=",".join(defaults.options),
                        help=f"comma-separated, today first; of {', '.join(OPTIONS)}")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens per caption (fixed)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="interleaved rounds measured")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="rounds run first, not counted")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads; onnxruntime intra-op threads follow")
    parser.add_argument("--out", type=Path, default=Path("build/bench/request"), help="output directory")
    parser.add_argument("--record", metavar="PROFILE",
                        help="also add the run to benchmarks/history/ under this profile name (e.g. request)")
    parser.add_argument("--note", default="", help="a remark stored with the record (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    start = time.monotonic()
    bundles = args.bundles
    if args.make_full_size:
        make_full_size_bundles(args.make_full_size)
        bundles = args.make_full_size
    profile = RequestProfile(bundles=bundles, options=[o for o in args.options.split(",") if o], tokens=args.tokens,
                             rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    try:
        report = run_request_profile(profile.validate())
    except (*USER_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_request_outputs(report, args.out)
    print((args.out / "request.md").read_text())
    if args.record:
        written.append(record_report(report, args.record, ROOT, note=args.note))
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"request profile: {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
