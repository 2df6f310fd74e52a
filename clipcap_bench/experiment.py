"""The experiment skeleton every benchmark shares: arms x inputs -> interleaved rounds -> samples.

A round runs every arm once on an input; the arms' order rotates from round to round, so no arm
always runs first (or right after another) and a drift in the machine's load falls on all alike.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

Sample = TypeVar("Sample")
Arm = TypeVar("Arm")


def rotation(names: list[Arm], index: int) -> list[Arm]:
    """`names` (arms) in the order of round `index`: rotated by one every round, so over len(names) rounds
    every arm runs once in every position."""
    shift = index % len(names) if names else 0
    return names[shift:] + names[:shift]


def interleaved_rounds(arms: dict[str, Callable[[Hashable], Sample]], inputs: Iterable[Hashable], rounds: int,
                       warmup: int = 0, progress: bool = True, desc: str = "rounds") -> dict[tuple[str, Hashable], list[Sample]]:
    """{(arm, input): [one sample per measured round]}: for each input, `warmup` + `rounds` rounds of every
    arm in rotation; warm-up samples are dropped."""
    from tqdm import tqdm

    inputs, names = list(inputs), list(arms)
    samples: dict[tuple[str, Hashable], list[Sample]] = {(name, item): [] for item in inputs for name in names}
    with tqdm(total=len(inputs) * len(names) * (warmup + rounds), desc=desc, unit="run", disable=not progress) as bar:
        for item in inputs:
            for index in range(warmup + rounds):
                for name in rotation(names, index):
                    sample = arms[name](item)
                    if index >= warmup:
                        samples[(name, item)].append(sample)
                    bar.update()
    return samples
