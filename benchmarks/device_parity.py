"""fp32 tokens of one model bundle on a device (CUDA) against the CPU reference, image by image.

    python benchmarks/device_parity.py BUNDLE [BUNDLE ...] --device cuda --out build/gpu-check/parity.json

Exit code 0 when every bundle's greedy and beam tokens are identical on both devices, 1 when one
differs (the report names the images and both token lists), 2 when the device cannot run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap_bench.device_parity import DeviceParityConfig, check_device_parity
from clipcap.cli import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    defaults = DeviceParityConfig(bundle=Path())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="model bundles")
    parser.add_argument("--device", default=defaults.device, help="the device checked against the CPU")
    parser.add_argument("--images", type=int, default=defaults.images, help="synthetic images per bundle")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: each bundle's max_tokens")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    reports = {}
    try:
        for bundle in args.bundles:
            config = DeviceParityConfig(bundle, device=args.device, images=args.images, max_tokens=args.max_tokens)
            reports[str(bundle)] = check_device_parity(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(reports, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for bundle, report in reports.items():
        counts = ", ".join(f"{name} {s['identical']}/{s['of']}" for name, s in report["strategies"].items())
        print(f"{bundle}: {args.device} vs cpu identical tokens: {counts}; "
              f"prefix max |diff| {report['prefix_max_abs_diff']:.2e}")
    return 0 if all(report["identical"] for report in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
