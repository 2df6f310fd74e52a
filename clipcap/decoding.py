"""Caption decoding over any `Runtime`: greedy, beam search and nucleus sampling, batched, with a KV cache.

The loops only call `runtime.step / embed / new_cache / select`, so every backend (torch,
onnxruntime, TensorRT) shares this one implementation. `NoCacheRuntime` wraps any runtime into the
paper's decoding (the whole sequence recomputed every step): the parity reference and the
benchmark baseline.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from clipcap.quoting import quote, quote_names
from clipcap.runtimes.base import Runtime

STRATEGIES = ("greedy", "beam", "nucleus")
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
        check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= token_limit),
              "max_tokens", f"an integer in 1..{token_limit}", self.max_tokens)
        check(_is_int(self.beam_size) and 1 <= self.beam_size <= self.MAX_BEAM_SIZE, "beam_size",
              f"an integer in 1..{self.MAX_BEAM_SIZE}", self.beam_size)
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        # Any positive temperature decodes stably (scaled_logits): a tiny one is the greedy limit.
        check(_is_number(self.temperature) and 0 < self.temperature <= self.MAX_TEMPERATURE, "temperature",
              f"a number in (0, {self.MAX_TEMPERATURE}]", self.temperature)
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
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
        return defaults.replace(**{REQUEST_OPTIONS[key]: value for key, value in data.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(rows, V) logits / temperature, in float64 and shifted so each row's maximum is 0.

    Finite for every temperature in (0, MAX_TEMPERATURE], a subnormal one included: the top token
    scores 0 and the others a negative number or -inf, never nan. So as the temperature shrinks,
    sampling and beam search reach greedy decoding (ties aside) instead of overflowing.
    """
    logits = logits.double()
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


# ---------------------------------------------------------------------------------------------
# Logits processors: small callables applied in order, (rows, V) -> (rows, V).


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return scaled_logits(logits, self.temperature)


class TopP:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least one)."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------------------------------------
# The one decoding entry point.


def generate(runtime: Runtime, prefix: torch.Tensor, options: DecodingOptions, stop_token_ids: list[int],
             max_tokens: int, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """(B, P, E) prefix embeddings -> B token-id lists, each ending with its stop token if one came.

    `max_tokens` is the resolved limit (options.max_tokens or the bundle default). `seeds`: nucleus
    only, one seed per row (a caller that splits a longer list into batches passes each row's own
    seed, so captions do not depend on the split); None: row i samples with `options.seed + i`.
    """
    if not options.use_cache:
        runtime = NoCacheRuntime(runtime)
    stop = torch.tensor([] if options.ignore_stop else stop_token_ids, dtype=torch.long, device=prefix.device)
    if options.strategy == "beam":
        return _beam_search(runtime, prefix, stop, max_tokens, options.beam_size, options.temperature)
    if options.strategy == "nucleus":
        choose = _nucleus_chooser(options, _row_seeds(options, prefix.shape[0], seeds))
        return _token_loop(runtime, prefix, stop, max_tokens, choose)
    return _token_loop(runtime, prefix, stop, max_tokens, _greedy_chooser)


def _row_seeds(options: DecodingOptions, batch_size: int, seeds: Sequence[int] | None = None) -> list[int]:
    """The seed each row samples with: `seeds` when given (checked), else options.seed + row index
    (a random base when options.seed is None)."""
    if seeds is None:
        base = options.seed if options.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return [base + row for row in range(batch_size)]
    seeds = list(seeds)
    if len(seeds) != batch_size:
        raise DecodingError(f"seeds: one per row expected, got {len(seeds)} for {batch_size} rows")
    bad = [seed for seed in seeds if not (_is_int(seed) and 0 <= seed < 2**63)]
    if bad:
        raise DecodingError(f"seeds must be non-negative integers below 2**63, got {quote(bad[0])}")
    return seeds


def _greedy_chooser(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _nucleus_chooser(options: DecodingOptions, seeds: list[int]) -> Callable:
    processors = [Temperature(options.temperature), TopP(options.top_p)]
    # One generator per input row: a row's caption depends on its seed, not on what else is in the batch.
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        for process in processors:
            logits = process(logits)
        probs = logits.softmax(-1).cpu()
        picks = [torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(rows.tolist())]
        return torch.cat(picks).to(logits.device)

    return choose


def _token_loop(runtime: Runtime, prefix: torch.Tensor, stop: torch.Tensor, max_tokens: int,
                choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """Greedy / sampling: one token per live row per step; finished rows leave the batch."""
    batch_size = prefix.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch_size)]
    rows = torch.arange(batch_size)  # original index of each live row
    logits, cache = runtime.step(prefix, runtime.new_cache(batch_size))
    for position in range(max_tokens):
        tokens = choose(logits, rows)  # (live,)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            outputs[row].append(token)
        if position == max_tokens - 1:
            break
        finished = torch.isin(tokens, stop)
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Dropping finished rows shrinks every later step (and the KV cache) to the live rows.
            rows, tokens = rows[keep.cpu()], tokens[keep]
            cache = runtime.select(cache, keep)
        logits, cache = runtime.step(runtime.embed(tokens[:, None]), cache)
    return outputs


def _beam_search(runtime: Runtime, prefix: torch.Tensor, stop: torch.Tensor, max_tokens: int,
                 beam_size: int, temperature: float) -> list[list[int]]:
    """The paper's `generate_beam`, batched over images: scores are length-normalised log-probs.

    A stopped beam extends only by token 0 at no cost and stops growing in length, exactly as the
    paper's code does, so results match it beam for beam.
    """
    batch_size, k = prefix.shape[0], beam_size
    device = prefix.device
    logits, cache = runtime.step(prefix, runtime.new_cache(batch_size))
    logprobs = scaled_logits(logits, temperature).log_softmax(-1).float()  # (B, V)
    vocab = logprobs.shape[-1]
    scores, first = logprobs.topk(k, dim=-1)  # (B, K)
    beam_rows = torch.arange(batch_size, device=device).repeat_interleave(k)  # (B*K,)
    cache = runtime.select(cache, beam_rows)
    sequences = first.reshape(-1, 1)  # (B*K, 1)
    scores = scores.reshape(-1)
    lengths = torch.ones(batch_size * k, device=device)
    stopped = torch.isin(sequences[:, 0], stop)
    image_offsets = (torch.arange(batch_size, device=device) * k)[:, None]  # (B, 1)
    for _ in range(1, max_tokens):
        if stopped.all():
            break
        logits, cache = runtime.step(runtime.embed(sequences[:, -1:]), cache)
        logprobs = scaled_logits(logits, temperature).log_softmax(-1).float()  # (B*K, V)
        logprobs[stopped] = float("-inf")
        logprobs[stopped, 0] = 0.0
        lengths = lengths + (~stopped).float()
        average = (scores[:, None] + logprobs) / lengths[:, None]  # (B*K, V)
        best, flat = average.view(batch_size, k * vocab).topk(k, dim=-1)  # (B, K)
        source = (image_offsets + flat // vocab).reshape(-1)  # (B*K,) rows the new beams extend
        new_tokens = (flat % vocab).reshape(-1, 1)
        lengths = lengths[source]
        scores = best.reshape(-1) * lengths
        sequences = torch.cat((sequences[source], new_tokens), dim=1)
        stopped = stopped[source] | torch.isin(new_tokens[:, 0], stop)
        cache = runtime.select(cache, source)
    best_beam = (scores / lengths).view(batch_size, k).argmax(-1)  # (B,)
    outputs = []
    for image in range(batch_size):
        row = image * k + int(best_beam[image])
        outputs.append(sequences[row, : int(lengths[row])].tolist())
    return outputs


class NoCacheRuntime:
    """Wraps a runtime into the paper's decoding: no KV cache, the whole sequence re-run every step.

    Its "cache" is the embedding sequence so far; `step` appends and runs the full sequence.
    """

    def __init__(self, runtime: Runtime):
        self.inner = runtime

    def new_cache(self, batch_size: int) -> torch.Tensor | None:
        return None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(token_ids)

    def step(self, embeds: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        sequence = embeds if cache is None else torch.cat((cache, embeds), dim=1)
        logits, _ = self.inner.step(sequence, self.inner.new_cache(sequence.shape[0]))
        return logits, sequence

    def select(self, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cache.index_select(0, index.to(cache.device))
