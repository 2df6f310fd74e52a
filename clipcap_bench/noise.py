"""A noise model of paired rounds fitted to a machine's recorded rounds, and the check's simulated error rates.

The serving records keep every round's rate for each model, the models alternating within a round:
exactly the paired, interleaved design of the regression check. For each cell the log ratio
between a model's round and the first model's same round, minus the cell's mean (a real
difference between the models is not noise), scaled by sqrt(n / (n - 1)) (the mean took a degree
of freedom), is one residual. The model resamples those residuals with random signs (under no
change an interleaved pair is as likely to go either way) and adds log(slowdown) to plant a change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clipcap_bench.paired import PairedTest, judge


@dataclass(frozen=True)
class NoiseModel:
    residuals: tuple[float, ...]  # paired log-ratio residuals of one round, as recorded
    source: str = ""  # which records they came from

    def __post_init__(self):
        if len(self.residuals) < 8:
            raise ValueError(f"a noise model needs at least 8 recorded residuals, got {len(self.residuals)}")

    @property
    def sigma(self) -> float:
        """A robust standard deviation: 1.4826 x the median absolute residual."""
        return 1.4826 * float(np.median(np.abs(self.residuals)))

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.choice(np.asarray(self.residuals), size=shape)
        return values * rng.choice((-1.0, 1.0), size=shape)


def fit_noise(records: list[dict], fingerprint: str | None = None) -> NoiseModel:
    """The residuals of every serving record's paired rounds (of one machine fingerprint, when given)."""
    residuals, used = [], 0
    for record in records:
        if record["kind"] != "serving" or (fingerprint and record["machine"]["fingerprint"] != fingerprint):
            continue
        cells = {(c["model"], c["concurrency"]): c.get("requests_per_s_rounds") or [] for c in record["cells"]}
        first = record["settings"]["models"][0]
        for (model, concurrency), rounds in cells.items():
            base = cells.get((first, concurrency)) or []
            n = min(len(rounds), len(base))
            if model == first or n < 2:
                continue
            logs = np.log(np.asarray(rounds[:n]) / np.asarray(base[:n]))
            residuals += ((logs - logs.mean()) * math.sqrt(n / (n - 1))).tolist()
        used += 1
    return NoiseModel(tuple(residuals), f"{used} serving record(s)" + (f" of {fingerprint}" if fingerprint else ""))


def flag_rate(noise: NoiseModel, rounds: int, slowdown: float = 1.0, reruns: int = 2000,
              test: PairedTest = PairedTest(), seed: int = 0) -> float:
    """The fraction of `reruns` simulated checks of `rounds` paired rounds that flag a regression when the
    new arm is `slowdown` times slower (1.0: unchanged code; the false-alarm rate)."""
    rng = np.random.default_rng(seed)
    diffs = math.log(slowdown) + noise.draw(rng, (reruns, rounds))
    old = [1.0] * rounds
    return sum(judge("t", old, np.exp(row).tolist(), "lower", test).verdict == "regression" for row in diffs) / reruns
