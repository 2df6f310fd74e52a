"""Quantisation of an export bundle's decoder (optionally its encoder): int8, int4 weight-only (CPU); fp16 (GPU).

    python export/quantize.py build/shapes-onnx                      # -> build/shapes-onnx-int8
    python export/quantize.py build/shapes-onnx --method int4-wo     # -> build/shapes-onnx-int4-wo
    python export/quantize.py build/shapes-onnx --method fp16 --encoder   # -> build/shapes-onnx-fp16 (GPUs)
    python export/quantize.py build/shapes-onnx --data build/demo/data/eval/captions.jsonl --limit 200
    python export/quantize.py build/shapes-onnx --encoder-method openvino-int8 --calibration-images DIR \
        --out build/shapes-onnx-ov      # OpenVINO int8 encoder (pip install 'clipcap-deploy[openvino]')
    clipcap caption build/shapes-onnx-int8 IMAGE... --backend onnxruntime

Writes a sibling export bundle (unchanged files hard-linked) and, given images or a caption
dataset, reports greedy agreement with the fp32 bundle and the caption-metric delta; the report is
also saved as quantization.json in the quantised bundle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap.cli import USER_ERRORS
from clipcap.export.quantize import ENCODER_METHODS, METHODS, QuantizeConfig, quantize_bundle
from clipcap.training.agreement import AgreementConfig, add_agreement_arguments, agreement_inputs, measure_agreement
from clipcap.training.data import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an fp32 export bundle (export/to_onnx.py)")
    parser.add_argument("--out", type=Path, help="default: EXPORT_DIR-int8 (or -METHOD) next to it")
    parser.add_argument("--encoder", action="store_true", help="quantise the encoder too (moves captions more)")
    parser.add_argument("--encoder-method", choices=ENCODER_METHODS,
                        help="the encoder's own method (implies --encoder), e.g. int8-dynamic beside --method int4-wo, "
                             "or openvino-int8 (NNCF static int8, run by OpenVINO; the openvino extra)")
    parser.add_argument("--calibration-images", type=Path,
                        help="openvino-int8: a directory of images like those to be served (default: random noise "
                             "images, with a warning and a note in export.json)")
    parser.add_argument("--calibration-size", type=int, default=QuantizeConfig.calibration_size,
                        help="openvino-int8: calibration images used at most")
    parser.add_argument("--smooth-quant", action="store_true",
                        help="openvino-int8: NNCF's SmoothQuant first (off: it lost cosine on inputs unlike the calibration set)")
    parser.add_argument("--per-channel", action="store_true", help="int8-dynamic: per-channel weight scales")
    parser.add_argument("--method", choices=METHODS, default=QuantizeConfig.method,
                        help="int8-dynamic (int8 weights, per-call activation scale) or weight-only MatMulNBits "
                             "int8-wo / int4-wo (batch invariant; needs the in-place decoder)")
    parser.add_argument("--block-size", type=int, default=QuantizeConfig.block_size, help="weight-only: weights per scale")
    parser.add_argument("--accuracy-level", type=int, default=QuantizeConfig.accuracy_level, choices=(0, 1, 2, 3, 4),
                        help="weight-only: 4 = int8 activations inside the kernel, 0/1 = fp32")
    add_agreement_arguments(parser, "where agreement runs: cpu, or cuda[:N] for an fp16 sibling (onnxruntime-gpu)")
    args = parser.parse_args(argv)
    config = QuantizeConfig(args.export_dir, args.out, encoder=args.encoder or bool(args.encoder_method),
                            per_channel=args.per_channel, method=args.method, block_size=args.block_size,
                            accuracy_level=args.accuracy_level, encoder_method=args.encoder_method,
                            calibration_images=args.calibration_images, calibration_size=args.calibration_size,
                            smooth_quant=args.smooth_quant)
    agreement = AgreementConfig(args.export_dir, config.out_dir, **agreement_inputs(args))
    try:
        measure = bool(args.images or args.data)
        if measure:
            agreement.check_inputs()  # before writing anything
        out = quantize_bundle(config)
        print(f"wrote {out}")
        if not measure:
            print("no --images or --data given: agreement with fp32 not measured")
            return 0
        result = measure_agreement(agreement)
    except (*USER_ERRORS, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = result.to_dict()
    (out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    encoder = config.graph_method("encoder") if config.encoder else "fp32"
    print("\n".join(result.summary_lines(f"{config.method} (encoder {encoder})")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
