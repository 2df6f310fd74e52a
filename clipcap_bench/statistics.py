"""Statistics of the measured samples: percentiles and dispersion, per-cell summaries, ratios, flatness, targets."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from clipcap_bench.backends import BACKENDS
from clipcap_bench.ratios import RATIOS
from clipcap_bench.targets import TARGETS, LatencyTargets


PERCENTILES = (50, 90, 99)


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation), mean, the sample count and the dispersion, in the values' unit.

    `iqr`: p75 - p25. `pNN_se`: the standard error of each percentile from the order statistics
    around it (distribution-free: the ranks n q -+ 1.96 sqrt(n q (1 - q)) bound a 95% interval,
    whose half width over 1.96 is the error); clipped to the extremes when n is small, so it is
    then the conservative (max - min) / 3.92. What the history's regression check weighs changes by.
    """
    array = np.sort(np.asarray(values, dtype=np.float64))
    stats = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    stats.update({"mean": float(array.mean()), "n": int(array.size),
                  "iqr": float(np.percentile(array, 75) - np.percentile(array, 25))})
    stats.update({f"p{p}_se": percentile_standard_error(array, p / 100) for p in PERCENTILES})
    return stats


def percentile_standard_error(sorted_values: np.ndarray, q: float, z: float = 1.96) -> float:
    """Half the width of the order-statistic 95% interval of quantile `q`, over z (0 for one value)."""
    n = sorted_values.size
    spread = z * np.sqrt(n * q * (1 - q))
    low = int(np.clip(np.floor(n * q - spread), 0, n - 1))
    high = int(np.clip(np.ceil(n * q + spread), 0, n - 1))
    return float((sorted_values[high] - sorted_values[low]) / (2 * z))


STAGES = ("preprocess", "encode", "first_step", "token_step", "decode", "end_to_end")


def summarize_cell(backend: str, batch_size: int, tokens: int, samples: list[dict]) -> dict:
    """One backend at one batch size and length: stage percentiles, throughput, per-token medians."""
    stages = {stage: percentiles([s[stage] for s in samples]) for stage in STAGES if stage != "token_step"}
    token_steps = np.asarray([s["token_steps"] for s in samples])  # (iterations, tokens - 1)
    if token_steps.size:
        stages["token_step"] = percentiles(token_steps.ravel().tolist())
    end_to_end = stages["end_to_end"]["p50"] / 1e3
    cell = {
        "backend": backend, "batch_size": batch_size, "tokens": tokens, "iterations": len(samples),
        "stages_ms": stages,
        "throughput": {"captions_per_s": batch_size / end_to_end, "tokens_per_s": batch_size * tokens / end_to_end,
                       "decode_tokens_per_s": batch_size * tokens / (stages["decode"]["p50"] / 1e3)},
        # Median over iterations of the step producing token k, for k = 2..tokens (token 1: the prefix step).
        "per_token_ms": np.median(token_steps, axis=0).tolist() if token_steps.size else [],
    }
    cell["flatness"] = flatness(cell["per_token_ms"])  # None below 60 tokens
    return cell


def find_cell(cells: list[dict], backend: str, batch_size: int, tokens: int) -> dict | None:
    return next((c for c in cells if (c["backend"], c["batch_size"], c["tokens"]) == (backend, batch_size, tokens)),
                None)


def compute_ratios(cells: list[dict]) -> list[dict]:
    """Every `RATIOS` entry at every (batch size, tokens) where both backends ran: p50 / p50."""
    rows = []
    for ratio in RATIOS:
        for cell in cells:
            if cell["backend"] != ratio.faster:
                continue
            slower = find_cell(cells, ratio.slower, cell["batch_size"], cell["tokens"])
            if slower is None:
                continue
            value = slower["stages_ms"][ratio.stage]["p50"] / cell["stages_ms"][ratio.stage]["p50"]
            rows.append({"key": ratio.key, "name": ratio.name, "slower": ratio.slower, "faster": ratio.faster,
                         "stage": ratio.stage, "batch_size": cell["batch_size"], "tokens": cell["tokens"], "speedup": value})
    return rows


def flatness(per_token_ms: list[float], first: int = 5, last: int = 60) -> dict | None:
    """How per-token step time changes from token `first` to token `last`.

    `trend`: the least-squares line through the per-token medians, its value at `last` over its value
    at `first`, minus one: a growth the noise of single steps cannot fake. `max_deviation`: the
    largest distance of one token's median from the median of the range (noise included).
    """
    # per_token_ms[i] is the step producing token i + 2.
    window = np.asarray(per_token_ms[first - 2: last - 1])
    if window.size < last - first + 1:
        return None
    tokens = np.arange(first, last + 1)
    slope, intercept = np.polyfit(tokens, window, 1)
    center = float(np.median(window))
    return {"tokens": [first, last], "median_ms": center,
            "trend": float((slope * last + intercept) / (slope * first + intercept) - 1),
            "max_deviation": float(np.abs(window / center - 1).max())}


# ---------------------------------------------------------------------------------------------
# Targets: measured and reported, never asserted.

def evaluate_targets(report: dict, targets: LatencyTargets = TARGETS.latency) -> list[dict]:
    """Every speed-up, encoder-floor and flatness goal of targets.toml, met or missed where measured."""
    rows = []
    names = {ratio.key: ratio.name for ratio in RATIOS}
    for target in targets.speedups:
        ratio = SimpleNamespace(key=target.ratio, name=names[target.ratio])
        title = f"{ratio.name} >= {target.minimum:g}x"
        matching = [r for r in report["ratios"] if r["key"] == ratio.key
                    and target.batch_size in (None, r["batch_size"]) and target.tokens in (None, r["tokens"])]
        for row in matching:
            rows.append({"target": title, "where": f"batch {row['batch_size']}, {row['tokens']} tokens",
                         "measured": f"{row['speedup']:.2f}x", "met": row["speedup"] >= target.minimum})
        if not matching:
            rows.append({"target": title, "where": f"batch {target.batch_size or 'any'}, {target.tokens or 'any'} "
                         "tokens", "measured": "not measured (a backend unavailable or the cell not run)",
                         "met": None})
    for row in report["roofline"].get("encoder", []):
        limit = targets.encoder_floor.get(row["batch_size"])
        if row["backend"] == "onnxruntime" and limit is not None:
            rows.append({"target": f"fp32 encoder <= {limit:g}x its floor", "where": f"batch {row['batch_size']}",
                         "measured": f"{row['x_floor']:.2f}x ({row['encode_ms']:.1f} ms, floor {row['floor_ms']:.1f} ms)",
                         "met": row["x_floor"] <= limit})
    for cell in report["cells"]:
        flat = cell.get("flatness")
        if flat is not None and BACKENDS[cell["backend"]].use_cache:
            rows.append({"target": f"{cell['backend']}: per-token decode flat within ±{targets.flatness:.0%}, "
                         "tokens 5-60", "where": f"batch {cell['batch_size']}, {cell['tokens']} tokens",
                         "measured": f"trend {flat['trend']:+.1%} (single tokens up to {flat['max_deviation']:.0%} "
                         "off the median)", "met": abs(flat["trend"]) <= targets.flatness})
    return rows
