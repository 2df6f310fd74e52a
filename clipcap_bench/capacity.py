"""The one capacity rule of the serving benchmarks: a rate meets the objective when every request sent was
answered 200 and their p99 is within it; an arm's capacity is the highest offered rate that meets it, as
every lower rate measured does. Capacity ratios against a baseline and their verdicts."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping


def meets_objective(cell: Mapping, slo_ms: float) -> bool:
    """One rate's cell (a `RateResult` as a dict) met the objective: requests were sent, every one was
    answered 200, and their p99 is within `slo_ms`."""
    return cell["sent"] > 0 and cell["ok"] == cell["sent"] and cell["latency_ms"]["p99"] <= slo_ms


@dataclass(frozen=True)
class Capacity:
    rate: float | None  # the highest offered rate at which, as at every lower rate measured, every request
    # was answered 200 with p99 within the objective; None: the lowest rate measured already missed
    censored: bool  # no rate measured missed: the capacity is at least `rate`, maybe more


def capacity(cells: list[dict], slo_ms: float, key: str = "model") -> dict[str, Capacity]:
    """Per arm of `cells` (open-loop cells; `key` names the arm: a model, a front), its capacity under
    `slo_ms`. A rate counts only if every lower one measured also met the objective: a miss bounds the
    capacity, whatever follows it."""
    by_model: dict[str, list[dict]] = {}
    for cell in cells:
        by_model.setdefault(cell[key], []).append(cell)
    result = {}
    for model, rows in by_model.items():
        rate, censored = None, True
        for cell in sorted(rows, key=lambda c: c["rate"]):
            if not meets_objective(cell, slo_ms):
                censored = False
                break
            rate = cell["rate"]
        result[model] = Capacity(rate, censored)
    return result


def target_verdict(baseline: Capacity, other: Capacity, target: float) -> tuple[float | None, str]:
    """(capacity ratio other / baseline, or None; "met" | "missed" | "undetermined: why") for `target`."""
    if baseline.rate is None:
        return None, "undetermined: the baseline missed the objective at the lowest rate (add lower rates)"
    if other.rate is None:
        return 0.0, "missed"
    ratio = other.rate / baseline.rate
    if baseline.censored:
        return ratio, "undetermined: the baseline met the objective at every rate measured (add higher rates)"
    if ratio >= target:
        return ratio, "met"
    if other.censored:
        return ratio, "undetermined: it met the objective at every rate measured (add higher rates)"
    return ratio, "missed"


def capacity_summary(cells: list[dict], models: list[str], slo_ms: float, target: float) -> dict:
    """Each model's capacity and, after the first (the baseline), its ratio to the baseline's and verdict."""
    capacities = capacity(cells, slo_ms)
    baseline = capacities.get(models[0], Capacity(None, False))
    rows = []
    for index, model in enumerate(models):
        found = capacities.get(model, Capacity(None, False))
        if index:
            ratio, verdict = target_verdict(baseline, found, target)
        else:
            ratio, verdict = (None if found.rate is None else 1.0), "baseline"
        rows.append({"model": model, **asdict(found), "ratio": ratio, "verdict": verdict})
    return {"slo_ms": slo_ms, "target_ratio": target, "baseline": models[0], "models": rows}


# -- outputs ---------------------------------------------------------------------------------------
