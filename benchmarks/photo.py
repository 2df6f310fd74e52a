"""The photo profile: photos as phones send them, decoded into model input by clipcap and by the anchors
in one interleaved run, a serving batch of eight 12 MP JPEGs, eight 36 MP decodes' peak RSS, and
(with --serve) open-loop Poisson load on bundles behind a private TorchServe, one bundle at a time.

    python benchmarks/photo.py --record                 # decode profile, added to benchmarks/history/
    python benchmarks/photo.py --serve --rates 1,2,4    # and open-loop serving load of the demo model
    python benchmarks/photo.py --serve-only --make-full-size build/bench/full-size \
        --full-size onnx-int8,onnx-int8-encoder --threads 2 --rates 0.5,1,1.5,2,2.5,3,4,5,6 --duration 30

The anchors simplejpeg and pyvips run where installed (`pip install .[photo]`). Writes photo.* (and
open_loop.*) to --out; with --record adds the runs to benchmarks/history/ under profile "photo".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clipcap_bench.history import record_report
from clipcap_bench.photo_profile import PhotoProfile, run_photo_profile, write_photo_outputs

ROOT = Path(__file__).resolve().parent.parent  # the checkout measured, whose commit a record names


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


FULL_SIZE_DEFAULT = "onnx-int8,onnx-int8-encoder"  # today's full-size export (fp32 encoder), then int8 encoder too


def main(argv: list[str] | None = None) -> int:
    from clipcap_bench.open_loop_profile import PAYLOADS, OpenLoopProfile

    defaults, serve_defaults = PhotoProfile(), OpenLoopProfile()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "photo" / "results")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="interleaved rounds measured")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="model input side")
    parser.add_argument("--serve", action="store_true", help="also open-loop load on the bundles served (needs Java)")
    parser.add_argument("--serve-only", action="store_true", help="the open-loop load alone, no decode profile")
    parser.add_argument("--bundle", type=Path, action="append", default=[], metavar="PATH",
                        help="a model or export bundle to serve (repeatable; served one at a time, the first is "
                             f"the capacity baseline); default: {serve_defaults.bundles[0]} unless --make-full-size")
    parser.add_argument("--make-full-size", type=Path, metavar="DIR",
                        help="build (once) ViT-B-32 + GPT-2 small with random weights and its exports in DIR "
                             "(clipcap_bench.bundles.make_full_size_bundles) and serve those --full-size names, "
                             "after any --bundle")
    parser.add_argument("--full-size", default=FULL_SIZE_DEFAULT, metavar="NAMES",
                        help="with --make-full-size: which to serve, in order, of model, onnx-fp32, onnx-int8, "
                             f"onnx-int8-wo, onnx-int4-wo, onnx-int8-encoder (default {FULL_SIZE_DEFAULT})")
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default=serve_defaults.payload,
                        help="images sent: 12 MP phone JPEGs, or the repository's samples/ PNGs")
    parser.add_argument("--rates", type=_floats, default=serve_defaults.rates, help="offered requests/s, e.g. 1,2,4")
    parser.add_argument("--duration", type=float, default=serve_defaults.duration_s, help="seconds of sending per rate")
    parser.add_argument("--slo-ms", type=float, default=serve_defaults.slo_ms, help="the latency objective")
    parser.add_argument("--max-tokens", type=int, default=serve_defaults.max_tokens,
                        help="sent with every request; 0: none sent (the handler's defaults)")
    parser.add_argument("--threads", type=int, default=serve_defaults.threads, help="OMP_NUM_THREADS of the worker")
    parser.add_argument("--all-rates", action="store_true", help="run every rate, also after a bundle's first miss")
    parser.add_argument("--record", action="store_true", help="add the runs to benchmarks/history/ (profile photo)")
    parser.add_argument("--note", default="", help="a remark stored with the records (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    serve = _serving_profile(parser, args) if args.serve or args.serve_only else None
    start = time.monotonic()
    reports, written = [], []
    if not args.serve_only:
        profile = PhotoProfile(iters=args.iters, image_size=args.image_size)
        reports.append(run_photo_profile(profile, ROOT))
        written += write_photo_outputs(reports[0], args.out)
        print((args.out / "photo.md").read_text())
    if serve is not None:
        from clipcap_bench.open_loop_profile import run_open_loop_profile, write_open_loop_outputs

        reports.append(run_open_loop_profile(serve, ROOT))
        written += write_open_loop_outputs(reports[-1], args.out)
        print((args.out / "open_loop.md").read_text())
    if args.record:
        written += [record_report(r, "photo", ROOT, note=args.note) for r in reports]
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"photo profile: {time.monotonic() - start:.0f} s")
    return 0


def _serving_profile(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The OpenLoopProfile the arguments ask for (building the full-size bundles first), or a usage error."""
    from clipcap_bench.bundles import bundle_kind, make_full_size_bundles
    from clipcap_bench.open_loop_profile import OpenLoopProfile

    given = [b.resolve() for b in args.bundle]  # relative to the working directory, as typed
    profile = OpenLoopProfile(bundles=given or OpenLoopProfile().bundles, rates=args.rates,
                              duration_s=args.duration, slo_ms=args.slo_ms, payload=args.payload,
                              max_tokens=args.max_tokens or None, threads=args.threads,
                              stop_after_miss=not args.all_rates)
    try:
        profile.validate()
    except ValueError as error:
        parser.error(str(error))
    if args.make_full_size:  # checked above first: a bad argument never waits for the build
        names = [n for n in args.full_size.split(",") if n]
        if not names:
            parser.error("--full-size: name at least one of the full-size bundles")
        built = make_full_size_bundles(args.make_full_size, exports=names != ["model"])
        unknown = [n for n in names if n not in built]
        if unknown:
            parser.error(f"--full-size: {', '.join(unknown)} not among the bundles built: {', '.join(built)}")
        profile.bundles = given + [built[n].resolve() for n in names]
    missing = [str(b) for b in profile.bundles if bundle_kind(ROOT / b) is None]
    if missing:
        parser.error(f"not a model or export bundle: {', '.join(missing)}")
    return profile


if __name__ == "__main__":
    sys.exit(main())
