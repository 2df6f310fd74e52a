"""Latency and throughput per stage, backend and batch size: every backend side by side in one run.

    python benchmarks/latency.py --make-full-size build/bench/full-size      # ViT-B-32 + GPT-2 small, random
    python benchmarks/latency.py build/bench/full-size/model build/bench/full-size/onnx \\
        build/bench/full-size/onnx-int8 --batch-sizes 1,8 --tokens 20,67 --out build/bench/latency

Each path is a model bundle or an export bundle (fp32 ONNX, int8 ONNX, TensorRT); each backend takes
the one it needs (torch, torch-nocache: the model bundle; onnxruntime: fp32; onnxruntime-int8: int8;
onnxruntime-int8-wo / -int4-wo: the weight-only siblings; tensorrt: engines), and a backend with no bundle or no hardware is reported unavailable with the
reason. Generation is fixed length (the stop token is ignored) so backends do identical work.
Writes latency.json, latency.md, latency_vs_batch.png and per_token_decode.png to --out and prints
the Markdown. `--peers` then decodes the same prefixes with other CPU systems (hf-generate; a peer
that cannot run, such as optimum, only when named, to say why), interleaved with our fp32
onnxruntime bundle (clipcap_bench.peers), into peers.json and peers.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipcap_bench.backends import BACKENDS
from clipcap_bench.bundles import make_full_size_bundles
from clipcap_bench.history import record_report
from clipcap_bench.latency import LatencyConfig, run_latency
from clipcap_bench.peers import DEFAULT_PEERS, PEERS
from clipcap_bench.report import write_latency_outputs
from clipcap.cli import USER_ERRORS

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose commit a record names


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    defaults = LatencyConfig(paths=[])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="*", help="model bundle and/or export bundles")
    parser.add_argument("--make-full-size", type=Path, metavar="DIR",
                        help="build (once) ViT-B-32 + GPT-2 small with random weights, its ONNX export and quantised "
                             "siblings in DIR/model, DIR/onnx, DIR/onnx-int8, DIR/onnx-int8-wo, DIR/onnx-int4-wo, "
                             "and benchmark them")
    parser.add_argument("--model-only", action="store_true",
                        help="with --make-full-size: build the model bundle alone (torch backends, e.g. on a GPU)")
    parser.add_argument("--backends", default=",".join(defaults.backends), help=f"of {', '.join(BACKENDS)}")
    parser.add_argument("--batch-sizes", type=_int_list, default=defaults.batch_sizes)
    parser.add_argument("--tokens", type=_int_list, default=defaults.tokens, help="tokens per caption (fixed)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="iterations per cell, not counted")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="measured iterations per cell")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="a backend stops measuring a cell after this much measured time (no-cache at long "
                             "captions), never before --min-iters")
    parser.add_argument("--min-iters", type=int, default=defaults.min_iters)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads; onnxruntime intra-op threads follow")
    parser.add_argument("--out", type=Path, default=Path("build/bench/latency"), help="output directory")
    parser.add_argument("--record", metavar="PROFILE",
                        help="also add the run to benchmarks/history/ under this profile name (e.g. full)")
    parser.add_argument("--note", default="", help="a remark stored with the record (e.g. 'machine busy')")
    parser.add_argument("--peers", nargs="?", const=",".join(DEFAULT_PEERS), default="",
                        help="also decode with peers, interleaved with our fp32 onnxruntime bundle (clipcap_bench.peers):"
                        f" {', '.join(PEERS)}; alone: {', '.join(DEFAULT_PEERS)} (the others cannot run and say why); "
                        "writes peers.json and peers.md")
    args = parser.parse_args(argv)
    paths = list(args.paths)
    if args.make_full_size:
        paths += list(make_full_size_bundles(args.make_full_size, exports=not args.model_only).values())
    if not paths:
        parser.error("give at least one bundle path, or --make-full-size DIR")
    config = LatencyConfig(paths=paths, backends=[b for b in args.backends.split(",") if b],
                           batch_sizes=args.batch_sizes, tokens=args.tokens, device=args.device, warmup=args.warmup,
                           iters=args.iters, time_budget_s=args.time_budget, min_iters=args.min_iters,
                           threads=args.threads)
    try:
        report = run_latency(config.validate())
    except (*USER_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_latency_outputs(report, args.out)
    print((args.out / "latency.md").read_text())
    if args.peers:
        written += _run_peers(args, paths)
    if args.record:
        written.append(record_report(report, args.record, ROOT, note=args.note))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _run_peers(args, paths: list[Path]) -> list[Path]:
    import json

    from clipcap_bench.bundles import bundle_kind
    from clipcap_bench.peers import PeerConfig, peers_markdown, run_peers

    kinds = {bundle_kind(p): p for p in paths}
    if "model" not in kinds or "onnx-fp32" not in kinds:
        print("peers: need a model bundle and an fp32 export bundle among the paths; not run", file=sys.stderr)
        return []
    config = PeerConfig(kinds["model"], kinds["onnx-fp32"], peers=args.peers.split(","), batch_sizes=args.batch_sizes,
                        tokens=max(args.tokens), rounds=max(1, args.iters), threads=args.threads or 1)
    report = run_peers(config)
    (args.out / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "peers.md").write_text(peers_markdown(report))
    print(peers_markdown(report))
    return [args.out / "peers.json", args.out / "peers.md"]


if __name__ == "__main__":
    sys.exit(main())
