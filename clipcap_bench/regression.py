"""The regression check: the newest record against the previous one, each change weighed by the runs' own noise.

A change is real when it exceeds both `z` combined standard errors (sqrt(se_old^2 + se_new^2), the
errors each run measured from its own iterations) and a floor `min_change` (relative): the noise
within a run does not see a neighbour that starts between two runs, so the floor covers that
drift. Absolute numbers are compared only between records of one machine fingerprint; ratios
(both sides measured in the same interleaved run) also against another machine when this one has
no earlier record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class CheckConfig:
    z: float = 3.0  # combined standard errors a change must exceed
    min_change: float = 0.10  # ... and this relative change (drift between runs the within-run noise misses)
    ratios_only: bool = False  # judge only ratios: on a shared machine absolute numbers move with the neighbours


@dataclass
class Change:
    metric: str
    old: float
    new: float
    noise: float  # combined standard error of new - old, in the metric's unit
    verdict: str  # "regression" | "improvement" | "within noise"

    @property
    def relative(self) -> float:
        return self.new / self.old - 1 if self.old else math.inf


def compare(old: dict, new: dict, config: CheckConfig = CheckConfig()) -> list[Change]:
    """Every checked metric in both records (absolute ones only on the same fingerprint), with its verdict."""
    same_machine = old["machine"]["fingerprint"] == new["machine"]["fingerprint"]
    changes = []
    for name, after in new["metrics"].items():
        before = old["metrics"].get(name)
        absolute_unfit = after["scope"] != "ratio" and (config.ratios_only or not same_machine)
        if before is None or not after.get("checked", True) or absolute_unfit:
            continue
        delta = after["value"] - before["value"]
        noise = math.hypot(before["noise"], after["noise"])
        real = abs(delta) > config.z * noise and abs(delta) > config.min_change * abs(before["value"])
        worse = delta < 0 if after["better"] == "higher" else delta > 0
        verdict = ("regression" if worse else "improvement") if real else "within noise"
        changes.append(Change(name, before["value"], after["value"], noise, verdict))
    return changes


def newest_pair(records: list[dict], fingerprint: str, kind: str, profile: str) -> tuple[dict | None, dict | None]:
    """(previous, newest) of one kind and profile on `fingerprint`; previous falls back to another machine's
    newest earlier record (ratios only then) when this machine has one record."""
    matching = [r for r in records if (r["kind"], r["profile"]) == (kind, profile)]
    mine = [r for r in matching if r["machine"]["fingerprint"] == fingerprint]
    if not mine:
        return None, None
    newest = mine[-1]
    if len(mine) >= 2:
        return mine[-2], newest
    others = [r for r in matching if r["machine"]["fingerprint"] != fingerprint
              and r["created_utc"] <= newest["created_utc"]]
    return (others[-1] if others else None), newest


def changes_markdown(old: dict, new: dict, changes: list[Change]) -> str:
    def label(record: dict) -> str:
        commit = record["commit"]
        return (f"{commit['short']}{' (dirty)' if commit['dirty'] else ''} measured {record['created_utc']} on "
                f"{record['machine']['fingerprint']}")

    lines = [f"## {new['kind']} ({new['profile']}): {label(new)} vs {label(old)}", "",
             "| metric | before | after | change | noise (1 se) | verdict |", "|---|---:|---:|---:|---:|---|"]
    order = {"regression": 0, "improvement": 1, "within noise": 2}
    for change in sorted(changes, key=lambda c: (order[c.verdict], c.metric)):
        mark = f"**{change.verdict}**" if change.verdict != "within noise" else change.verdict
        lines.append(f"| {change.metric} | {change.old:.4g} | {change.new:.4g} | {change.relative:+.1%} | "
                     f"{change.noise:.2g} | {mark} |")
    return "\n".join(lines) + "\n"
