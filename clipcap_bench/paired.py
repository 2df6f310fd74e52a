"""The regression test: paired, interleaved rounds of two arms, judged by a one-sided Wilcoxon signed-rank test.

Each round runs both arms back to back (the order alternating, A B then B A, so a drift in the
machine's load falls on both alike) and reduces each arm's samples to one number (a median). The
paired difference of round i is d_i = log(worse-direction ratio), e.g. log(new / old) for a time:
positive means the new arm is slower. A change is a **regression** when both hold:

- the exact one-sided signed-rank test rejects "no change" at `alpha` (no assumption about the
  noise's shape: under no change, interleaving makes each d_i as likely positive as negative), and
- the Hodges-Lehmann estimate of the change (the median of all pairwise means of the d_i) exceeds
  `min_effect`: a real but negligible change is not an alarm.

Under no change the first condition alone fires in at most `alpha` of reruns, whatever the noise;
the power against a given slowdown depends on the noise and the number of rounds
(`clipcap_bench.noise` simulates both from this machine's recorded rounds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class PairedTest:
    alpha: float = 0.01  # one-sided level of the signed-rank test: the false-alarm rate's ceiling
    min_effect: float = 0.10  # a relative change smaller than this is never flagged (10%)

    def __post_init__(self):
        if not 0 < self.alpha < 1 or self.min_effect < 0:
            raise ValueError(f"alpha must be in (0, 1) and min_effect >= 0, got {self.alpha}, {self.min_effect}")


@dataclass(frozen=True)
class PairedVerdict:
    metric: str
    rounds: int
    change: float  # Hodges-Lehmann estimate of new / old - 1 in the worse direction (+0.25: 25% worse)
    p_worse: float  # one-sided p-value of "new is worse"
    p_better: float  # one-sided p-value of "new is better"
    verdict: str  # "regression" | "improvement" | "within noise"


def hodges_lehmann(diffs: np.ndarray) -> float:
    """The median of the Walsh averages (d_i + d_j) / 2, i <= j: the signed-rank test's estimate of the shift."""
    diffs = np.asarray(diffs, dtype=np.float64)
    i, j = np.triu_indices(diffs.size)
    return float(np.median((diffs[i] + diffs[j]) / 2))


@lru_cache(maxsize=64)
def _null_counts(doubled_ranks: tuple[int, ...]) -> np.ndarray:
    """How many of the 2^n sign patterns give each doubled rank sum (exact, ties as mid-ranks)."""
    counts = np.zeros(sum(doubled_ranks) + 1, dtype=np.float64)
    counts[0] = 1
    for rank in doubled_ranks:
        shifted = np.zeros_like(counts)
        shifted[rank:] = counts[:counts.size - rank]
        counts = counts + shifted
    return counts


def signed_rank_p(diffs: np.ndarray) -> tuple[float, float]:
    """Exact one-sided p-values (positive shift, negative shift) of Wilcoxon's signed-rank test.

    Zero differences are dropped (Wilcoxon's rule); ties share the mean of their ranks. With no
    non-zero difference both p-values are 1.
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    diffs = diffs[diffs != 0]
    if diffs.size == 0:
        return 1.0, 1.0
    magnitudes = np.abs(diffs)
    order = np.argsort(magnitudes, kind="stable")
    ranks = np.empty(diffs.size)
    ranks[order] = np.arange(1, diffs.size + 1)
    for value in np.unique(magnitudes):  # mid-ranks for ties
        tied = magnitudes == value
        ranks[tied] = ranks[tied].mean()
    doubled = np.rint(2 * ranks).astype(int)  # mid-ranks are multiples of 1/2
    counts = _null_counts(tuple(sorted(doubled.tolist())))
    total = counts.sum()
    positive = int(doubled[diffs > 0].sum())
    negative = int(doubled.sum()) - positive
    return float(counts[positive:].sum() / total), float(counts[negative:].sum() / total)


def judge(metric: str, old: list[float], new: list[float], better: str, test: PairedTest = PairedTest()) -> PairedVerdict:
    """The verdict on one metric measured in paired rounds (`old[i]` and `new[i]` from round i)."""
    if len(old) != len(new) or not old:
        raise ValueError(f"{metric}: paired rounds needed, got {len(old)} old and {len(new)} new values")
    if better not in ("higher", "lower"):
        raise ValueError(f"{metric}: better must be 'higher' or 'lower', got {better!r}")
    old_values, new_values = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if (old_values <= 0).any() or (new_values <= 0).any():
        raise ValueError(f"{metric}: every round's value must be positive (a ratio is taken)")
    diffs = np.log(new_values / old_values) * (1 if better == "lower" else -1)  # > 0: worse
    p_worse, p_better = signed_rank_p(diffs)
    shift = hodges_lehmann(diffs)
    threshold = math.log1p(test.min_effect)
    if p_worse <= test.alpha and shift > threshold:
        verdict = "regression"
    elif p_better <= test.alpha and -shift > threshold:
        verdict = "improvement"
    else:
        verdict = "within noise"
    return PairedVerdict(metric, len(old), math.expm1(shift), p_worse, p_better, verdict)


def verdicts_markdown(title: str, verdicts: list[PairedVerdict], test: PairedTest) -> str:
    lines = [f"## {title}", "",
             f"Paired interleaved rounds; one-sided Wilcoxon signed-rank test at alpha {test.alpha:g} and a minimum "
             f"effect of {test.min_effect:.0%} (Hodges-Lehmann estimate).", "",
             "| metric | rounds | change (worse +) | p worse | p better | verdict |", "|---|---:|---:|---:|---:|---|"]
    for v in verdicts:
        mark = f"**{v.verdict}**" if v.verdict != "within noise" else v.verdict
        lines.append(f"| {v.metric} | {v.rounds} | {v.change:+.1%} | {v.p_worse:.3g} | {v.p_better:.3g} | {mark} |")
    return "\n".join(lines) + "\n"
