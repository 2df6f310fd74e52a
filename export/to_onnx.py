"""Export a model bundle to an ONNX export bundle, checked against PyTorch.

    python export/to_onnx.py models/shapes-demo --out build/shapes-onnx
    clipcap caption build/shapes-onnx IMAGE... --backend onnxruntime

Writes encoder.onnx (pixels -> prefix and the CLIP embedding; `--encoder-attention fused` writes
onnxruntime's Attention op in every ViT block), mapper.onnx (CLIP embedding -> prefix), decoder.onnx (one
GPT-2 step with KV cache: by default onnxruntime's fused attention writing a preallocated cache in
place; `--decoder-cache concat` for TensorRT), token_embeddings.safetensors, the bundle's clipcap.json and tokenizer,
and export.json with the parity measured here (max abs diff per graph; greedy and beam tokens vs
PyTorch, to max_tokens: any difference fails the export).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.export.onnx import ExportError, ExportOptions, export_bundle
from clipcap.formats.graph_specs import DECODER_KINDS, ENCODER_ATTENTIONS
from clipcap.runtimes import set_compute_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="model bundle (clipcap.json + model.safetensors + tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="export bundle directory to write")
    parser.add_argument("--no-parity", dest="check_parity", action="store_false",
                        help="skip the onnxruntime-vs-PyTorch checks (not recommended)")
    parser.add_argument("--parity-images", type=int, default=ExportOptions.parity_images,
                        help="images decoded greedy and beam (to max_tokens) by both PyTorch and onnxruntime")
    parser.add_argument("--decoder-cache", choices=DECODER_KINDS, default=ExportOptions.decoder_cache,
                        help="; ".join(f"{kind.name}: {kind.summary}" for kind in DECODER_KINDS.values()))
    parser.add_argument("--encoder-attention", choices=ENCODER_ATTENTIONS, default=ExportOptions.encoder_attention,
                        help="; ".join(f"{kind.name}: {kind.summary}" for kind in ENCODER_ATTENTIONS.values()))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and of the parity check's onnxruntime sessions (default: each one's)")
    args = parser.parse_args(argv)
    if args.threads:
        set_compute_threads(args.threads)
    try:
        manifest = export_bundle(args.bundle, ExportOptions(out=args.out, check_parity=args.check_parity,
                                                            parity_images=args.parity_images,
                                                            decoder_cache=args.decoder_cache,
                                                            encoder_attention=args.encoder_attention))
    except (BundleError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, graph in manifest.graphs.items():
        parity = graph.parity
        measured = f"max abs diff vs PyTorch {parity['max_abs_diff']:.2e} (bound {parity['atol']:g})" if parity else ""
        print(f"{graph.file:<14} exported in {graph.export_seconds:>5.1f} s  {measured}")
    if manifest.decoding_parity:
        print(f"greedy and beam tokens identical to PyTorch: {json.dumps(manifest.decoding_parity)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
