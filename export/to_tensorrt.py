"""Build TensorRT engines from a model bundle or any fp32 ONNX export (needs the tensorrt package and a CUDA GPU).

    python export/to_tensorrt.py models/shapes-demo --out build/shapes-trt [--fp16] [--max-batch 8] [--max-tokens 67]
    python export/to_tensorrt.py build/shapes-onnx --out build/shapes-trt    # an export of either decoder kind
    clipcap caption build/shapes-trt IMAGE... --backend tensorrt --device cuda

TensorRT parses the concat decoder (standard ONNX operators): from a model bundle, or from an export
whose decoder is the in-place kind (re-exported from the model bundle it records, or --model), the
concat graphs are exported first, to a temporary directory. Writes encoder/mapper/decoder .engine
files, profiles.json (the min/opt/max shapes used, and the parity measured after the build: greedy
and beam tokens vs PyTorch on 4 images: for fp32 any difference fails the build, for fp16 the
captions agreeing are counted), a timing
cache reused by later builds, and the bundle's config, tokenizer and token table.
`--print-profiles` prints each profile's min/opt/max shape per input, one line each, without
building (works anywhere, no tensorrt needed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.export.onnx import ExportError
from clipcap.export.tensorrt import TensorRTBuildConfig, build_engines, compute_profiles
from clipcap.formats.model_bundle import load_config
from clipcap.runtimes import RuntimeUnavailable


def build_parser() -> argparse.ArgumentParser:
    d = TensorRTBuildConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a model bundle, or an fp32 export bundle (export/to_onnx.py)")
    parser.add_argument("--out", type=Path, help="engine bundle directory (required unless --print-profiles)")
    parser.add_argument("--model", type=Path, help="the model bundle: PyTorch reference of the parity check and "
                                                   "source of the concat graphs (default: BUNDLE if a model bundle, "
                                                   "else the one its export.json records)")
    parser.add_argument("--fp16", action="store_true", help="fp16 engines (graphs converted to fp16 first)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per call")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest caption (default: the bundle's)")
    parser.add_argument("--max-beam", type=int, default=d.max_beam, help="largest beam size to support")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch size kernels are tuned for (default: max)")
    parser.add_argument("--workspace-gib", type=float, default=d.workspace_gib)
    parser.add_argument("--timing-cache", type=Path, help="default: OUT/timing.cache")
    parser.add_argument("--no-parity", dest="check_parity", action="store_false",
                        help="skip the engines-vs-PyTorch decoding check (not recommended)")
    parser.add_argument("--parity-images", type=int, default=d.parity_images,
                        help="images decoded greedy and beam by both PyTorch and the engines")
    parser.add_argument("--print-profiles", action="store_true",
                        help="print each profile's min/opt/max shape per input and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.print_profiles:
        parser.error("--out is required to build engines")
    try:
        if args.print_profiles:
            profiles = compute_profiles(load_config(args.bundle), args.max_batch, args.max_tokens,
                                        args.max_beam, args.opt_batch)
            for graph, graph_profiles in profiles.items():
                for profile in graph_profiles:
                    for name, (low, opt, high) in profile.shapes.items():
                        print(f"{graph:<8} {profile.name:<7} {name:<26} min {list(low)} opt {list(opt)} max {list(high)}")
            return 0
        record = build_engines(TensorRTBuildConfig(
            source=args.bundle, out=args.out, model=args.model, fp16=args.fp16, max_batch=args.max_batch,
            max_tokens=args.max_tokens, max_beam=args.max_beam, opt_batch=args.opt_batch,
            workspace_gib=args.workspace_gib, timing_cache=args.timing_cache, check_parity=args.check_parity,
            parity_images=args.parity_images))
    except (BundleError, ExportError, RuntimeUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(e['file'] for e in record['engines'].values())} and profiles.json to {args.out} "
          f"(TensorRT {record['tensorrt']}, {record['precision']})")
    if "decoding_parity" in record:
        print(f"greedy and beam tokens vs PyTorch: {json.dumps(record['decoding_parity'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
