"""Greedy-caption agreement of one bundle under two runtimes, or of two bundles: what a precision option costs.

    python export/agreement.py models/shapes-demo --candidate-backend torch-bf16 \
        --data build/heldout/captions.jsonl --limit 500     # CLIP's tower in bfloat16 vs float32
    python export/agreement.py build/shapes-onnx --candidate build/shapes-onnx-int8 --images samples/*.png

quantize.py measures its sibling this way as it writes it; this script measures what it is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap.cli import USER_ERRORS
from clipcap.formats.detect import detect
from clipcap.runtimes import RUNTIMES
from clipcap.training.agreement import AgreementConfig, add_agreement_arguments, agreement_inputs, measure_agreement
from clipcap.training.data import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the reference bundle (its fp32 form)")
    parser.add_argument("--candidate", type=Path, help="the candidate bundle (default: the reference itself)")
    parser.add_argument("--reference-backend", choices=sorted(RUNTIMES), help="default: the one its kind needs")
    parser.add_argument("--candidate-backend", choices=sorted(RUNTIMES), help="default: the one its kind needs")
    add_agreement_arguments(parser)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    candidate = args.candidate or args.reference
    try:
        backends = (args.reference_backend or detect(args.reference).backend,
                    args.candidate_backend or detect(candidate).backend)
        if candidate == args.reference and backends[0] == backends[1]:
            parser.error("the candidate is the reference: give --candidate or another --candidate-backend")
        config = AgreementConfig(args.reference, candidate, backends=backends, **agreement_inputs(args))
        result = measure_agreement(config)
    except (*USER_ERRORS, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        report = {"reference": str(args.reference), "candidate": str(candidate), "backends": list(backends),
                  **result.to_dict()}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{candidate} ({backends[1]}) against {args.reference} ({backends[0]})")
    print("\n".join(result.summary_lines(backends[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
