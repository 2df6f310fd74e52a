"""The cold-start profile: install size, process start -> first caption and idle worker memory, per install.

    python benchmarks/cold_start.py --venv core=build/venv-core --venv full=.venv \
        --bundle demo=build/bench/demo-export --bundle full-int8=build/bench/full-size/onnx-int8-encoder

Each --venv is an install of this project (LABEL=PATH): the core install without torch (the slim
worker; `pip install .` in a new virtualenv) beside make setup's full one (today's path). Each
--bundle (LABEL=PATH) is served by `clipcap caption`, `clipcap serve-ray` and TorchServe (where the
install has it), started --starts times each, installs alternating (clipcap_bench.cold_start).
Writes cold_start.json/.md/.png to --out; --record adds the run to benchmarks/history/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipcap_bench.cold_start import FRONTS, ColdStartConfig, run_cold_start, write_outputs
from clipcap_bench.history import record_report

ROOT = Path(__file__).resolve().parent.parent


def _labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    defaults = ColdStartConfig(venvs={}, bundles={}, repo=ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=_labelled, action="append", required=True, help="LABEL=PATH of a virtualenv")
    parser.add_argument("--bundle", type=_labelled, action="append", required=True, help="LABEL=PATH of a bundle")
    parser.add_argument("--fronts", default=",".join(FRONTS), help="comma-separated, from " + ", ".join(FRONTS))
    parser.add_argument("--starts", type=int, default=defaults.starts, help="starts per arm (median reported)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="compute threads of every worker")
    parser.add_argument("--image", type=Path, help="the image captioned (default: a synthetic 12 MP JPEG)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "cold-start")
    parser.add_argument("--record", action="store_true", help="add the run to benchmarks/history/ (profile cold-start)")
    parser.add_argument("--note", default="", help="a remark stored with the record")
    args = parser.parse_args(argv)
    config = ColdStartConfig(venvs=dict(args.venv), bundles=dict(args.bundle), repo=ROOT,
                             fronts=tuple(f for f in args.fronts.split(",") if f), starts=args.starts,
                             threads=args.threads, image=args.image, work_dir=args.out / "work")
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    report = run_cold_start(config)
    written = write_outputs(report, args.out)
    if args.record:
        written.append(record_report(report, "cold-start", ROOT, note=args.note))
    print((args.out / "cold_start.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
