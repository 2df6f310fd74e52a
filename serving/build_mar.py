"""Pack a model bundle or an export bundle into a TorchServe archive (default build/model_store/clipcap.mar).

    python serving/build_mar.py --bundle models/shapes-demo
    python serving/build_mar.py --bundle build/export/shapes-demo

The archive holds the bundle (as bundle/), serving/handler.py and serving/model-config.yaml, with
--backend / --device-type written into the packed copy of model-config.yaml.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap.export.mar import ArchiveConfig, build_archive

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle or export bundle directory")
    parser.add_argument("--backend", help="torch, torch-bf16, onnxruntime or tensorrt (default: model-config.yaml's)")
    parser.add_argument("--device-type", choices=("cpu", "gpu"), help="TorchServe deviceType (default: the yaml's)")
    parser.add_argument("--out", type=Path, default=ArchiveConfig.out, help="archive path, NAME.mar")
    parser.add_argument("--model-config", type=Path, default=HERE / "model-config.yaml")
    args = parser.parse_args(argv)
    config = ArchiveConfig(bundle=args.bundle, handler=HERE / "handler.py", model_config=args.model_config,
                           out=args.out, backend=args.backend, device_type=args.device_type)
    try:
        out = build_archive(config)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # BundleError, ServingConfigError: ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {args.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
