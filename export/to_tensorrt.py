"""Build TensorRT engines from an ONNX export bundle (needs the tensorrt package and a CUDA GPU).

    python export/to_tensorrt.py build/shapes-onnx --out build/shapes-trt [--fp16] [--max-batch 8] [--max-tokens 67]
    clipcap caption build/shapes-trt IMAGE... --backend tensorrt --device cuda

Writes encoder/mapper/decoder .engine files, profiles.json (the min/opt/max shapes used), a timing
cache reused by later builds, and the bundle's config, tokenizer and token table. `--print-profiles`
prints the profiles without building (works anywhere, no tensorrt needed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.export.tensorrt import TensorRTBuildConfig, build_engines, compute_profiles
from clipcap.formats.model_bundle import load_config
from clipcap.runtimes import RuntimeUnavailable


def build_parser() -> argparse.ArgumentParser:
    d = TensorRTBuildConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an fp32 export bundle (export/to_onnx.py)")
    parser.add_argument("--out", type=Path, help="engine bundle directory (required unless --print-profiles)")
    parser.add_argument("--fp16", action="store_true", help="fp16 engines (graphs converted to fp16 first)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per call")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest caption (default: the bundle's)")
    parser.add_argument("--max-beam", type=int, default=d.max_beam, help="largest beam size to support")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch size kernels are tuned for (default: max)")
    parser.add_argument("--workspace-gib", type=float, default=d.workspace_gib)
    parser.add_argument("--timing-cache", type=Path, help="default: OUT/timing.cache")
    parser.add_argument("--print-profiles", action="store_true", help="print the profiles as JSON and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.print_profiles:
        parser.error("--out is required to build engines")
    try:
        if args.print_profiles:
            profiles = compute_profiles(load_config(args.export_dir), args.max_batch, args.max_tokens,
                                        args.max_beam, args.opt_batch)
            for graph, graph_profiles in profiles.items():
                for profile in graph_profiles:
                    for name, (low, opt, high) in profile.shapes.items():
                        print(f"{graph:<8} {profile.name:<7} {name:<26} min {list(low)} opt {list(opt)} max {list(high)}")
            return 0
        record = build_engines(TensorRTBuildConfig(
            export_dir=args.export_dir, out=args.out, fp16=args.fp16, max_batch=args.max_batch,
            max_tokens=args.max_tokens, max_beam=args.max_beam, opt_batch=args.opt_batch,
            workspace_gib=args.workspace_gib, timing_cache=args.timing_cache))
    except (BundleError, RuntimeUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(e['file'] for e in record['engines'].values())} and profiles.json to {args.out} "
          f"(TensorRT {record['tensorrt']}, {record['precision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
