"""Is the working tree slower than the previous commit? Paired interleaved rounds of both, a stated test.

    python benchmarks/check.py                          # HEAD~1 against the working tree, 30 paired rounds
    python benchmarks/check.py --base HEAD --fail-on-regression   # uncommitted changes; exit 1 on a regression
    python benchmarks/check.py --rerun                  # the working tree against itself (confirm a flag)
    python benchmarks/check.py --records                # the two newest history records, change by change

The default run captions with the demo bundle in two worker processes, one per arm, alternating
round by round, and judges ttft, tpot, e2e and goodput with a one-sided Wilcoxon signed-rank test
(--alpha) and a minimum effect (--min-effect): clipcap_bench/paired.py. Peaks at 2.3 GiB of memory
(three processes); results in build/bench/check/ (nothing tracked is written). `--records` compares
history records instead: runs minutes or days apart, so their differences include the machine's
drift; it reports, the paired run decides.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap_bench.ab import ABConfig, run_ab
from clipcap_bench.history import HISTORY_DIR, load_records
from clipcap_bench.paired import PairedTest, PairedVerdict, verdicts_markdown
from clipcap_bench.regression import CheckConfig, changes_markdown, compare, newest_pair

ROOT = Path(__file__).resolve().parent.parent


def check_records(args: argparse.Namespace) -> int:
    from clipcap_bench.machine import fingerprint, machine_info

    machine = args.fingerprint or fingerprint(machine_info())
    records = load_records(args.history)
    regressions = 0
    for kind in [k for k in args.kinds.split(",") if k]:
        previous, newest = newest_pair(records, machine, kind, args.profile)
        if newest is None or previous is None:
            print(f"{kind} ({args.profile}): fewer than two records to compare for machine {machine}")
            continue
        config = CheckConfig(z=args.z, min_change=args.min_change, ratios_only=args.ratios_only)
        changes = compare(previous, newest, config)
        print(changes_markdown(previous, newest, changes))
        regressions += sum(c.verdict == "regression" for c in changes)
    print(f"{regressions} regression(s)")
    return 1 if regressions and args.fail_on_regression else 0


def check_paired(args: argparse.Namespace) -> int:
    config = ABConfig(base=args.base, rounds=args.rounds, rerun=args.rerun, slowdown=args.slowdown)
    test = PairedTest(alpha=args.alpha, min_effect=args.min_effect)
    report = run_ab(config, ROOT, test, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"{'the working tree again' if args.rerun else args.base} (old) vs the working tree (new)"
    markdown = verdicts_markdown(title, [PairedVerdict(**v) for v in report["verdicts"]], test)
    (args.out / "check.md").write_text(markdown)
    print(markdown)
    regressions = sum(v["verdict"] == "regression" for v in report["verdicts"])
    print(f"{regressions} regression(s); wrote {args.out / 'check.json'}, {args.out / 'check.md'}")
    return 1 if regressions and args.fail_on_regression else 0


def main(argv: list[str] | None = None) -> int:
    ab, test, records = ABConfig(), PairedTest(), CheckConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=ab.base, help="git revision of the old arm (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=ab.rounds, help="paired rounds (default: %(default)s)")
    parser.add_argument("--rerun", action="store_true", help="the working tree against itself (A/A)")
    parser.add_argument("--slowdown", type=float, default=ab.slowdown,
                        help="plant a slowdown in the new arm, e.g. 1.25 (to see the check catch one)")
    parser.add_argument("--alpha", type=float, default=test.alpha, help="the signed-rank test's one-sided level")
    parser.add_argument("--min-effect", type=float, default=test.min_effect, help="smallest change flagged (0.10: 10%%)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "check")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a metric regressed")
    parser.add_argument("--records", action="store_true", help="compare the two newest history records instead")
    parser.add_argument("--history", type=Path, default=ROOT / HISTORY_DIR, help="(--records) directory of records")
    parser.add_argument("--profile", default="quick", help="(--records) profile")
    parser.add_argument("--kinds", default="latency,serving", help="(--records) which runs to compare")
    parser.add_argument("--fingerprint", help="(--records) machine fingerprint (default: this machine's)")
    parser.add_argument("--z", type=float, default=records.z, help="(--records) standard errors a change exceeds")
    parser.add_argument("--min-change", type=float, default=records.min_change,
                        help="(--records) relative change a real change exceeds")
    parser.add_argument("--ratios-only", action="store_true", help="(--records) judge only ratios")
    args = parser.parse_args(argv)
    try:
        return check_records(args) if args.records else check_paired(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
