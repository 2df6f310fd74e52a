"""Decoding options: one `DecodingOptions` for the CLI, the serving fronts and the benchmarks, and its rules.

Torch-free, so the command line checks its flags (and `--help` runs) without loading a model. An
option only some strategies use is refused with another strategy rather than silently ignored:
`--beam-size 3` without `--decoding beam` is an error that says so, and so is a request's
`beam_size` without `"decoding": "beam"` (`check_used`, one rule for both).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from clipcap.quoting import quote, quote_names

STRATEGIES = ("greedy", "beam", "nucleus")
# Options only some strategies read -> those strategies. Set with another strategy, each is refused.
USED_BY = {"beam_size": ("beam",), "top_p": ("nucleus",), "temperature": ("beam", "nucleus"), "seed": ("nucleus",)}
# Options a client may set per request (JSON keys, form fields) -> the DecodingOptions field each sets.
REQUEST_OPTIONS = {"decoding": "strategy", "max_tokens": "max_tokens", "beam_size": "beam_size",
                   "top_p": "top_p", "temperature": "temperature", "seed": "seed"}


class DecodingError(ValueError):
    """Decoding options out of range; the message names the option."""


@dataclass
class DecodingOptions:
    """One object for the CLI, the serving handler and the benchmarks."""

    strategy: str = "greedy"  # greedy | beam | nucleus
    max_tokens: int | None = None  # None: the bundle's max_tokens (67, the paper's entry_length)
    beam_size: int = 5  # beam: the paper's default
    top_p: float = 0.9  # nucleus: smallest token set whose probability reaches top_p
    temperature: float = 1.0  # beam and nucleus: logits / temperature
    seed: int | None = None  # nucleus: row i of a call samples with seed + i, unless the call passes `seeds`
    use_cache: bool = True  # False: the paper's full recomputation (reference and baseline)
    ignore_stop: bool = False  # benchmarks: generate exactly max_tokens so backends do equal work

    # Bounds a client may ask for; beyond them a request is refused, not clipped.
    MAX_BEAM_SIZE = 16
    MAX_TEMPERATURE = 10.0

    def validate(self, token_limit: int) -> "DecodingOptions":
        """Check every option's type and range; `token_limit` is the most tokens the model's positions allow.
        A message quotes a bad value only as `quote` does (a short prefix and its size)."""
        def check(ok: bool, name: str, rule: str, value: Any) -> None:
            if not ok:
                raise DecodingError(f"{name} must be {rule}, got {quote(value)}")

        check(isinstance(self.strategy, str) and self.strategy in STRATEGIES, "decoding",
              f"one of {', '.join(STRATEGIES)}", self.strategy)
        check(self.max_tokens is None or (is_int(self.max_tokens) and 1 <= self.max_tokens <= token_limit),
              "max_tokens", f"an integer in 1..{token_limit}", self.max_tokens)
        check(is_int(self.beam_size) and 1 <= self.beam_size <= self.MAX_BEAM_SIZE, "beam_size",
              f"an integer in 1..{self.MAX_BEAM_SIZE}", self.beam_size)
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        # Any positive temperature decodes stably (scaled_logits): a tiny one is the greedy limit.
        check(is_number(self.temperature) and 0 < self.temperature <= self.MAX_TEMPERATURE, "temperature",
              f"a number in (0, {self.MAX_TEMPERATURE}]", self.temperature)
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
              "an integer in 0..2**63-1", self.seed)
        return self

    def replace(self, **changes: Any) -> "DecodingOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_request(cls, data: dict, defaults: "DecodingOptions") -> "DecodingOptions":
        """Options a client may set per request (`REQUEST_OPTIONS` keys); unknown keys are refused."""
        unknown = [key for key in data if key not in REQUEST_OPTIONS]
        if unknown:
            raise DecodingError(f"unknown option(s) {quote_names(unknown)}; known: {', '.join(REQUEST_OPTIONS)}")
        options = defaults.replace(**{REQUEST_OPTIONS[key]: value for key, value in data.items()})
        check_used(options.strategy, data, "decoding")
        return options


def check_used(strategy: Any, names: Iterable[str], strategy_name: str = "decoding",
               spell=lambda name: name) -> None:
    """Refuse an option (`names`: DecodingOptions fields or request keys) that `strategy` would ignore.
    `strategy_name` and `spell` write the message in the caller's terms (`--decoding`, `--beam-size`).
    An unknown strategy passes: `validate` refuses it with its own message."""
    if strategy not in STRATEGIES:
        return
    for name in names:
        users = USED_BY.get(name)
        if users is not None and strategy not in users:
            raise DecodingError(f"{spell(name)} is used only by {strategy_name} {' or '.join(users)}, not by "
                                f"{strategy_name} {strategy}, which would ignore it: set {strategy_name} "
                                f"{users[0]} too, or leave {spell(name)} out")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
