"""Image encoder options side by side: open_clip eager and each export bundle's encoder graph, one interleaved run.

    python benchmarks/encoder.py build/bench/full-size/model build/bench/full-size/onnx \\
        build/bench/full-size/onnx-fused build/bench/full-size/onnx-int8-enc --out build/bench/encoder

The first path is the model bundle (open_clip eager, the reference embeddings; with --torch-bf16
also in bfloat16); the others are export bundles whose encoder graphs are timed. Writes encoder.json, encoder.md and encoder.png to
--out and prints the Markdown (clipcap_bench.encoder).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap_bench.encoder import EncoderBenchConfig, encoder_markdown, plot_encoder, run_encoder_bench
from clipcap.cli import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    defaults = EncoderBenchConfig(model=Path())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the model bundle (open_clip eager)")
    parser.add_argument("exports", type=Path, nargs="*", help="export bundles (their encoder graphs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-sizes", default=",".join(map(str, defaults.batch_sizes)))
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--torch-bf16", action="store_true",
                        help="also open_clip with its tower in bfloat16 (the torch-bf16 backend; fast on AVX-512 BF16 / AMX)")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(v) for v in args.batch_sizes.split(",") if v)
        config = EncoderBenchConfig(model=args.model, exports=args.exports, batch_sizes=batches, rounds=args.rounds,
                                    warmup=args.warmup, threads=args.threads,
                                    torch_bf16=args.torch_bf16)
        report = run_encoder_bench(config)
    except (*USER_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = encoder_markdown(report)
    (args.out / "encoder.md").write_text(markdown)
    plot_encoder(report, args.out / "encoder.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
