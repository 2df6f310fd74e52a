"""The photo profile: photos as phones send them, decoded into model input by clipcap and by the anchors
in one interleaved run, a serving batch of eight 12 MP JPEGs, eight 36 MP decodes' peak RSS, and
(with --serve) open-loop Poisson load on the demo model behind a private TorchServe.

    python benchmarks/photo.py --record                 # decode profile, added to benchmarks/history/
    python benchmarks/photo.py --serve --rates 1,2,4    # and open-loop serving load of the demo model

The anchors simplejpeg and pyvips run where installed (`pip install .[photo]`). Writes photo.* (and
open_loop.*) to --out; with --record adds the runs to benchmarks/history/ under profile "photo".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clipcap.bench.history import record_report
from clipcap.bench.photo_profile import PhotoProfile, run_photo_profile, write_photo_outputs

ROOT = Path(__file__).resolve().parent.parent  # the checkout measured, whose commit a record names


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    defaults = PhotoProfile()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "photo" / "results")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="interleaved rounds measured")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="model input side")
    parser.add_argument("--serve", action="store_true", help="also open-loop load on the demo model (needs Java)")
    parser.add_argument("--rates", type=_floats, default=[1.0, 2.0, 4.0], help="offered requests/s, e.g. 1,2,4")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sending per rate")
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="the latency objective counted against")
    parser.add_argument("--record", action="store_true", help="add the runs to benchmarks/history/ (profile photo)")
    parser.add_argument("--note", default="", help="a remark stored with the records (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    start = time.monotonic()
    profile = PhotoProfile(iters=args.iters, image_size=args.image_size)
    reports = [run_photo_profile(profile, ROOT)]
    written = write_photo_outputs(reports[0], args.out)
    print((args.out / "photo.md").read_text())
    if args.serve:
        from clipcap.bench.open_loop_profile import OpenLoopProfile, run_demo_open_loop, write_open_loop_outputs

        reports.append(run_demo_open_loop(OpenLoopProfile(rates=args.rates, duration_s=args.duration,
                                                          slo_ms=args.slo_ms), ROOT))
        written += write_open_loop_outputs(reports[1], args.out)
        print((args.out / "open_loop.md").read_text())
    if args.record:
        written += [record_report(r, "photo", ROOT, note=args.note) for r in reports]
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"photo profile: {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
