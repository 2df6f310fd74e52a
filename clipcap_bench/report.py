"""Latency and serving reports rendered as Markdown tables and PNG plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipcap_bench.schema import write_outputs


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _header(report: dict, title: str) -> list[str]:
    machine, load = report["machine"], report["load_average"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    gpu = f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else "; no GPU"
    return [f"# {title}", "",
            f"Measured {report['created_utc']} on **{machine['cpu']}** (ISA: {', '.join(machine.get('isa') or ['not recorded'])}), "
            f"{machine['logical_cores']} logical cores, "
            f"{machine['memory_gb']} GB{gpu}; {machine['os']}.", "", f"Versions: {versions}.", "",
            f"Load average (1/5/15 min) before {', '.join(f'{v:.2f}' for v in load['before'])}; after "
            f"{', '.join(f'{v:.2f}' for v in load['after'])} (a shared machine: compare ratios, not absolutes).", ""]


def latency_markdown(report: dict) -> str:
    settings, peaks = report["settings"], report["peaks"]
    threads = ", ".join(f"{k} {v}" for k, v in settings["threads"].items())
    lines = _header(report, "Latency per stage, backend and batch size") + [
        f"Settings: device {settings['device']}, warm-up {settings['warmup']} + {settings['iters']} measured iterations "
        f"per backend and cell" + (f" (a backend stops after {settings['time_budget_s']:g} s of measured time in a "
                                   f"cell, never before {settings['min_iters']} iterations: see `n`)"
                                   if settings["time_budget_s"] else "")
        + f"; backends interleaved round-robin, the order rotated every iteration; threads: {threads}; input images "
        f"{settings['image_size'][0]}x{settings['image_size'][1]} RGB.", "",
        f"Decoding: {settings['decoding']}.", "",
        f"This machine's ceilings (best of 5, {peaks['threads']} thread(s)): fp32 matmul {peaks['matmul_gflops']:.1f} "
        f"GFLOP/s (the fastest of " + ", ".join(f"{library} {max(rates.values()):.1f}" for library, rates in
                                                 peaks["matmul_gflops_by_library"].items())
        + f" over square sizes {', '.join(map(str, next(iter(peaks['matmul_gflops_by_library'].values()))))}), "
        f"memory {peaks['bandwidth_gbps']:.1f} GB/s (the faster of a read, {peaks['read_gbps']:.1f}, and a copy counting "
        f"read + write, {peaks['copy_gbps']:.1f}; {peaks['bandwidth_mb']} MB).",
        "", "## Backends", "", "| backend | what | status |", "|---|---|---|"]
    for name, info in report["backends"].items():
        status = "measured" if info["available"] else f"unavailable: {info['reason']}"
        lines.append(f"| {name} | {info['what']} | {status} |")
    lines += ["", "## Stages (ms; p50 unless marked; `n` measured iterations)", "",
              "| backend | batch | tokens | n | preprocess | encode | first step | token step p50 / p99 | decode "
              "| end to end p50 / p90 / p99 | captions/s | tokens/s |", "|---|" + "---:|" * 11]
    for cell in sorted(report["cells"], key=lambda c: (c["tokens"], c["batch_size"], c["backend"])):
        s = cell["stages_ms"]
        token = f"{_fmt(s['token_step']['p50'])} / {_fmt(s['token_step']['p99'])}" if "token_step" in s else "–"
        e2e = s["end_to_end"]
        lines.append(f"| {cell['backend']} | {cell['batch_size']} | {cell['tokens']} | {cell['iterations']} | "
                     f"{_fmt(s['preprocess']['p50'])} | {_fmt(s['encode']['p50'])} | {_fmt(s['first_step']['p50'])} | "
                     f"{token} | {_fmt(s['decode']['p50'])} | {_fmt(e2e['p50'])} / {_fmt(e2e['p90'])} / "
                     f"{_fmt(e2e['p99'])} | {cell['throughput']['captions_per_s']:.2f} | "
                     f"{cell['throughput']['tokens_per_s']:.1f} |")
    lines += ["", "## Speed-ups (p50 over p50, both from this run)", "", "| comparison | batch | tokens | speed-up |",
              "|---|---:|---:|---:|"]
    for ratio in report["ratios"]:
        lines.append(f"| {ratio['name']} | {ratio['batch_size']} | {ratio['tokens']} | {ratio['speedup']:.2f}x |")
    trends = [c for c in report["cells"] if c.get("flatness")]
    if trends:
        lines += ["", "## Per-token decode time, tokens 5 to 60", "",
                  "Trend: the least-squares line through the per-token medians, its value at token 60 over token 5. "
                  "Plotted in per_token_decode.png.", "",
                  "| backend | batch | tokens | median step ms | trend 5 -> 60 | largest single-token deviation |",
                  "|---|---:|---:|---:|---:|---:|"]
        for cell in trends:
            flat = cell["flatness"]
            lines.append(f"| {cell['backend']} | {cell['batch_size']} | {cell['tokens']} | {flat['median_ms']:.1f} | "
                         f"{flat['trend']:+.0%} | {flat['max_deviation']:.0%} |")
    lines += ["", "## Targets", "", "| target | where | measured | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        met = {True: "**met**", False: "**missed**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['target']} | {target['where']} | {target['measured']} | {met} |")
    roof = report["roofline"]
    model = roof["model"]
    lines += ["", "## Roofline: what one decoder step computes and moves", "",
              f"GPT-2 with {model['n_layer']} layers, width {model['n_embd']}, vocabulary {model['vocab_size']}: "
              f"{model['parameters_read_per_step'] / 1e6:.1f} M parameters read per step (blocks + LM head). FLOPs: "
              "2 x (12 E^2 per layer + LM head E V) per image + attention 4 E x context per layer; bytes: decoder "
              "weights as stored (ONNX graph size, int8 included) + KV cache read and written. Fractions are of the "
              "ceilings above; `floor` is the slower of compute and memory at those ceilings.", "",
              f"Machine balance here: {peaks['matmul_gflops'] / peaks['bandwidth_gbps']:.1f} FLOP per byte; a step below "
              "that is memory-bound.", "",
              "| batch | token | GFLOP | weights MB (fp32) | KV MB | FLOP / byte |", "|---:|---:|---:|---:|---:|---:|"]
    for row in roof["step_costs_fp32"]:
        lines.append(f"| {row['batch_size']} | {row['token']}{' (prefix step)' if row['token'] == 1 else ''} | "
                     f"{row['gflop']:.3f} | {row['weight_mb']:.0f} | {row['kv_mb']:.2f} | {row['flop_per_byte']:.2f} |")
    lines += ["", "Measured: the token step's p50 (all tokens of all iterations) against the cost at mid-caption:", "",
              "| backend | batch | step ms | GFLOP | weights MB | KV MB | GFLOP/s (of matmul) | GB/s (of memory) | floor ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in roof["rows"]:
        lines.append(f"| {row['backend']} | {row['batch_size']} | {row['step_ms']:.1f} | {row['gflop']:.2f} | "
                     f"{row['weight_mb']:.0f} | {row['kv_mb']:.1f} | {row['gflops']:.1f} ({row['matmul_fraction']:.0%}) | "
                     f"{row['gbps']:.1f} ({row['bandwidth_fraction']:.0%}) | {row['floor_ms']:.1f} |")
    if any(row["backend"].endswith("int8") for row in roof["rows"]):
        lines += ["", "int8 rows: their matrix products run in int8 (VNNI dot products where the CPU has them), whose "
                  "rate is above the fp32 matmul ceiling measured here, so their share of it can pass 100% and "
                  "their compute floor is overstated."]
    if roof.get("encoder"):
        lines += ["", "## Roofline: the image encoder", "",
                  "The CLIP ViT's FLOPs per image (patch embedding, every block's projections, MLP and attention, the "
                  "final projection; the mapper not counted) against the fp32 matmul ceiling above; bytes: the encoder "
                  "graph as stored (fp32 parameters for torch). `x floor`: encode p50 over the slower of compute and "
                  "memory at the ceilings.", "",
                  "| backend | batch | encode ms | GFLOP | weights MB | GFLOP/s (of matmul) | floor ms | x floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in roof["encoder"]:
            lines.append(f"| {row['backend']} | {row['batch_size']} | {row['encode_ms']:.1f} | {row['gflop']:.2f} | "
                         f"{row['weight_mb']:.0f} | {row['gflops']:.1f} ({row['matmul_fraction']:.0%}) | "
                         f"{row['floor_ms']:.1f} | {row['x_floor']:.2f} |")
    lines += ["", "The KV-cache speed-up these ceilings allow (decode, fp32, a perfect implementation of both: the cached "
              "step bound by memory, the recomputing one by compute): " + ", ".join(
                  f"batch {b['batch_size']} x {b['tokens']} tokens {b['speedup']:.1f}x" for b in roof["kv_cache_bound"])
              + "."]
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """Lay out, write as PNG and free a matplotlib figure (pyplot keeps every open figure alive). The saved
    area grows to hold every title and the figure's legend, so none is clipped."""
    plt = pyplot()

    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def log_where_spread(axis, x_base: float | None = None, y_base: float | None = None) -> None:
    """Log scale on x (and/or y) only where the plotted values span more than one positive value: a log
    axis over a single point has no range to show."""
    for base, values, set_scale in ((x_base, "get_xdata", axis.set_xscale), (y_base, "get_ydata", axis.set_yscale)):
        if base is None:
            continue
        data = np.concatenate([np.asarray(getattr(line, values)(), dtype=float).ravel() for line in axis.get_lines()]
                              or [np.zeros(0)])
        data = data[np.isfinite(data)]
        if data.size and (data > 0).all() and np.unique(data).size > 1:
            set_scale("log", base=base)


def figure_legend(figure, axes, **options) -> None:
    """One legend for the whole figure, below it: every distinct label of every panel, once."""
    entries = {}
    for axis in np.ravel(axes):
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(list(entries.values()), list(entries), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=min(4, len(entries)), fontsize=8, **options)


def plot_latency(report: dict, path: Path) -> Path:
    """End-to-end p50 latency (bars to p90) and captions/s against batch size, a panel per caption length."""
    plt = pyplot()
    lengths = sorted({c["tokens"] for c in report["cells"]})
    figure, axes = plt.subplots(2, len(lengths), figsize=(5.5 * len(lengths), 8), squeeze=False)
    for column, tokens in enumerate(lengths):
        for backend in report["backends"]:
            cells = sorted((c for c in report["cells"] if c["backend"] == backend and c["tokens"] == tokens),
                           key=lambda c: c["batch_size"])
            if not cells:
                continue
            batches = [c["batch_size"] for c in cells]
            p50 = np.array([c["stages_ms"]["end_to_end"]["p50"] for c in cells])
            p90 = np.array([c["stages_ms"]["end_to_end"]["p90"] for c in cells])
            axes[0, column].errorbar(batches, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3,
                                     label=backend)
            axes[1, column].plot(batches, [c["throughput"]["captions_per_s"] for c in cells], marker="o", label=backend)
        for row, label in ((0, "end to end, ms (p50, bar to p90)"), (1, "captions / s")):
            axis = axes[row, column]
            log_where_spread(axis, x_base=2, y_base=10)
            axis.set_xlabel("batch size")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
        axes[0, column].set_title(f"{tokens} tokens per caption (fixed length)")
    figure_legend(figure, axes)
    figure.suptitle(f"{report['machine']['cpu']} ({report['settings']['device']}, "
                    f"{report['settings']['threads']['torch_intra_op']} thread(s))")
    return save_figure(figure, path)


def plot_per_token(report: dict, path: Path) -> Path:
    """Median time of each decoder step against the token it produces (longest caption), a panel per batch size."""
    plt = pyplot()
    tokens = max(c["tokens"] for c in report["cells"])
    batches = sorted({c["batch_size"] for c in report["cells"] if c["tokens"] == tokens})
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for cell in report["cells"]:
            if (cell["tokens"], cell["batch_size"]) == (tokens, batch) and cell["per_token_ms"]:
                axis.plot(range(2, tokens + 1), cell["per_token_ms"], label=cell["backend"])
        log_where_spread(axis, y_base=10)
        axis.set_xlabel("token produced by the step")
        axis.set_ylabel("step time, ms (median over iterations)")
        axis.set_title(f"batch {batch}, {tokens} tokens")
        axis.grid(True, which="both", alpha=0.3)
    figure_legend(figure, axes)
    figure.suptitle("Per-token decode: flat with a KV cache, growing without (the paper's decoding)")
    return save_figure(figure, path)


def write_latency_outputs(report: dict, out: Path) -> list[Path]:
    """latency.json, latency.md, latency_vs_batch.png, per_token_decode.png in `out`."""
    return write_outputs(report, out, "latency", latency_markdown,
                         {"latency_vs_batch.png": plot_latency, "per_token_decode.png": plot_per_token})


def serving_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = _header(report, "Serving: TorchServe under load") + [
        f"Target {settings['url']}, models {', '.join(settings['models'])} (alternating, {settings['rounds']} rounds "
        f"per level); {settings['requests']} requests per model and level, capped at {settings['duration_s']:g} s; "
        f"{settings['warmup']} warm-up requests per model; token authorization "
        f"{'on' if settings['token_authorization'] else 'off'}; images: {settings['images']}.", "",
        "Latency is the client's (request sent to answer read); `handler` is the time the handler reports "
        "(preprocess + encode + decode of the batch the request was in).", ""]
    for model, described in settings["server"].items():
        lines.append(f"- server settings of {model}: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    if settings["server"]:
        lines.append("")
    lines += [
        "| model | concurrency | ok / sent | req/s | vs first model | latency p50 | p90 | p99 | handler p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = report["settings"]["models"][0]
    for cell in sorted(report["cells"], key=lambda c: (c["concurrency"], c["model"])):
        base = next(c for c in report["cells"] if c["model"] == first and c["concurrency"] == cell["concurrency"])
        latency = cell["latency_ms"]
        lines.append(f"| {cell['model']} | {cell['concurrency']} | {cell['ok']} / {cell['sent']} | "
                     f"{cell['requests_per_s']:.2f} | {cell['requests_per_s'] / base['requests_per_s']:.2f}x | "
                     f"{_fmt(latency['p50'])} | {_fmt(latency['p90'])} | {_fmt(latency['p99'])} | "
                     f"{_fmt(cell['handler_ms']['p50'])} |")
    errors = [f"- {c['model']} x{c['concurrency']}: {c['statuses']} {c['errors']}" for c in report["cells"]
              if set(c["statuses"]) != {"200"}]
    if errors:
        lines += ["", "Non-200 answers:", *errors]
    return "\n".join(lines) + "\n"


def plot_serving(report: dict, path: Path) -> Path:
    """req/s and latency p50/p99 against concurrency, a line per model."""
    plt = pyplot()
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in report["settings"]["models"]:
        cells = sorted((c for c in report["cells"] if c["model"] == model), key=lambda c: c["concurrency"])
        levels = [c["concurrency"] for c in cells]
        throughput.plot(levels, [c["requests_per_s"] for c in cells], marker="o", label=model)
        line, = latency.plot(levels, [c["latency_ms"]["p50"] for c in cells], marker="o", label=f"{model} p50")
        latency.plot(levels, [c["latency_ms"]["p99"] for c in cells], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{model} p99")
    for axis, label in ((throughput, "requests / s"), (latency, "latency, ms")):
        log_where_spread(axis, x_base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    log_where_spread(latency, y_base=10)
    figure_legend(figure, [latency])  # its labels name every model (p50 and p99)
    figure.suptitle(f"TorchServe on {report['machine']['cpu']} ({report['machine']['logical_cores']} cores)")
    return save_figure(figure, path)


def write_serving_outputs(report: dict, out: Path) -> list[Path]:
    """serving.json, serving.md, serving.png in `out`."""
    return write_outputs(report, out, "serving", serving_markdown, {"serving.png": plot_serving})
