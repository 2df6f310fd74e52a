"""Trend plots of the history: per metric, one line per machine fingerprint, commits in order on the x axis."""
from __future__ import annotations

import html
import textwrap
from pathlib import Path

FAMILIES = {  # metric family -> (file stem, title)
    "captions_per_s": ("captions_per_s", "captions/s end to end (higher is better)"),
    "ms_per_token": ("ms_per_token", "decoder token step p50, ms (lower is better)"),
    "ratio": ("ratios", "speed-ups measured within one interleaved run (higher is better)"),
    "roofline": ("roofline", "token step's share of the machine's measured peaks"),
    "serving_rps": ("serving_rps", "serving req/s (higher is better)"),
    "serving_p99": ("serving_p99", "serving latency p99, ms (lower is better)"),
}


def commit_order(records: list[dict]) -> list[str]:
    """Short commit ids ordered by commit date (then first measurement): the x axis."""
    first: dict[str, tuple] = {}
    for record in records:
        commit = record["commit"]
        first.setdefault(commit["short"], (commit["date"] or record["created_utc"], record["created_utc"]))
    return sorted(first, key=first.get)


def plot_trends(records: list[dict], out: Path, profile: str = "quick") -> list[Path]:
    """A PNG per metric family (a panel per metric), index.html showing them and summary.md (every value);
    returns the files written."""
    from clipcap_bench.report import figure_legend, pyplot, save_figure

    plt = pyplot()
    records = [r for r in records if r["profile"] == profile]
    if not records:
        raise ValueError(f"no records of profile {profile!r} to plot")
    out.mkdir(parents=True, exist_ok=True)
    commits = commit_order(records)
    position = {sha: index for index, sha in enumerate(commits)}
    machines = sorted({r["machine"]["fingerprint"] for r in records})
    written = []
    for family, (stem, title) in FAMILIES.items():
        names = sorted({n for r in records for n, m in r["metrics"].items() if m["family"] == family})
        if not names:
            continue
        columns = min(4, len(names))
        rows = -(-len(names) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
        for axis, name in zip(axes.flat, names):
            for machine in machines:
                points = sorted((position[r["commit"]["short"]], r["metrics"][name]) for r in records
                                if r["machine"]["fingerprint"] == machine and name in r["metrics"])
                if not points:
                    continue
                xs = [x for x, _ in points]
                axis.errorbar(xs, [m["value"] for _, m in points], yerr=[m["noise"] for _, m in points],
                              marker="o", capsize=3, label=machine)
            axis.set_title(textwrap.fill(name, 36), fontsize=9)  # wrapped: a long name never runs into its neighbour
            axis.set_xticks(range(len(commits)), commits, rotation=45, fontsize=7)
            axis.grid(True, alpha=0.3)
        for axis in list(axes.flat)[len(names):]:
            axis.set_visible(False)
        figure_legend(figure, axes, title="machine", title_fontsize=8)
        figure.suptitle(textwrap.fill(f"{title}; bars: 1 standard error measured by each run ({profile} profile)",
                                      40 * columns))
        written.append(save_figure(figure, out / f"{stem}.png"))
    written.append(_write_index(records, machines, written, out / "index.html"))
    (out / "summary.md").write_text(summary_markdown(records))
    return written + [out / "summary.md"]


def summary_markdown(records: list[dict]) -> str:
    """Every metric (rows) of every record (columns: commit, machine, time), value +- its standard error."""
    lines = ["| metric | " + " | ".join(
        f"{r['commit']['short']}{'+' if r['commit']['dirty'] else ''} {r['kind']} on {r['machine']['fingerprint']}, "
        f"{r['created_utc'][:16]}" for r in records) + " |", "|---|" + "---:|" * len(records)]
    for name in sorted({n for r in records for n in r["metrics"]}):
        cells = [f"{r['metrics'][name]['value']:.3g} ± {r['metrics'][name]['noise']:.2g}" if name in r["metrics"]
                 else "" for r in records]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(["`+`: the tree differed from the commit (see each record's note).", "", *lines]) + "\n"


def hardware_text(hardware: dict) -> str:
    """A fingerprint's hardware in words: "AMD EPYC 7B13 (AVX2), 2 logical cores, 25 GB, no GPU"."""
    isa = f" ({', '.join(hardware['isa'])})" if hardware.get("isa") else ""
    gpu = f"GPU {hardware['gpu']}" if hardware.get("gpu") else "no GPU"
    return f"{hardware['cpu']}{isa}, {hardware['logical_cores']} logical cores, {hardware['memory_gb']} GB, {gpu}"


def _write_index(records: list[dict], machines: list[str], images: list[Path], path: Path) -> Path:
    """A page with every plot and a table of the machines: which fingerprint is which hardware, in words."""
    rows = []
    for machine in machines:
        hardware = next(r["machine"]["hardware"] for r in records if r["machine"]["fingerprint"] == machine)
        count = sum(r["machine"]["fingerprint"] == machine for r in records)
        rows.append(f"<tr><td>{machine}</td><td>{html.escape(hardware_text(hardware))}</td><td>{count}</td></tr>")
    body = "\n".join(f'<h2>{html.escape(p.stem)}</h2><img src="{p.name}">' for p in images)
    path.write_text("<!doctype html><meta charset=utf-8><title>clipcap benchmark trends</title>\n"
                    "<h1>Benchmark trends</h1><table border=1><tr><th>fingerprint</th><th>hardware</th>"
                    f"<th>records</th></tr>{''.join(rows)}</table>\n{body}\n")
    return path
