"""Caption decoding over any `Runtime`: greedy, beam search and nucleus sampling, batched, with a KV cache.

Each request is a `DecodeSequence` (its strategy's state, fed its rows' logits); a `DecodeBatch` steps
any mix of them together, letting one join after its prefix step and leave when done. `generate`
(images that start together) and the serving engine (iteration-level batching) both run on it, and
it only calls `runtime.step / embed / new_cache / select / join`, so every backend (torch,
onnxruntime, TensorRT) shares this one implementation, written against the array API: it runs on the
runtime's own arrays (numpy for onnxruntime, torch for torch and TensorRT) and reads back one token
id a step, as greedy's argmax does. Nucleus sampling draws its uniforms host-side from numpy's PCG64
seeded by the request, and picks by inverse CDF over the kept probabilities in vocabulary order, so
one seed gives one caption on every backend (up to a uniform landing within rounding of a boundary). `NoCacheRuntime` wraps any runtime into the
paper's decoding (the whole sequence recomputed every step): the parity reference and the
benchmark baseline.
"""
from __future__ import annotations

import secrets
from typing import Any, Sequence

import numpy as np

import clipcap.arrays as arrays
from clipcap.decoding_options import (REQUEST_OPTIONS, STRATEGIES, USED_BY, DecodingError, DecodingOptions, check_used,
                                      is_int)
from clipcap.quoting import quote
from clipcap.runtimes.base import Runtime

# The options live in clipcap.decoding_options (torch-free); they are imported from here as well.
__all__ = ["REQUEST_OPTIONS", "STRATEGIES", "USED_BY", "BeamSequence", "DecodeBatch", "DecodeSequence", "DecodingError",
           "DecodingOptions", "NoCacheRuntime", "Temperature", "TokenSequence", "TopP", "check_used", "generate",
           "new_sequence", "scaled_logits", "stop_ids"]


def scaled_logits(logits: Any, temperature: float) -> Any:
    """(rows, V) logits / temperature, in float64 and shifted so each row's maximum is 0.

    Finite for every temperature in (0, MAX_TEMPERATURE], a subnormal one included: the top token
    scores 0 and the others a negative number or -inf, never nan. So as the temperature shrinks,
    sampling and beam search reach greedy decoding (ties aside) instead of overflowing.
    """
    xp = arrays.namespace(logits)
    logits = xp.astype(logits, xp.float64)
    return (logits - xp.max(logits, axis=-1, keepdims=True)) / temperature


# ---------------------------------------------------------------------------------------------
# Logits processors: small callables applied in order, (rows, V) -> (rows, V).


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: Any) -> Any:
        return scaled_logits(logits, self.temperature)


class TopP:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least one)."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, logits: Any) -> Any:
        xp = arrays.namespace(logits)
        order = xp.argsort(logits, axis=-1, descending=True, stable=True)
        probs = arrays.softmax(xp.take_along_axis(logits, order, axis=-1))
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (xp.cumulative_sum(probs, axis=-1) - probs) >= self.top_p
        drop = xp.take_along_axis(drop_sorted, xp.argsort(order, axis=-1), axis=-1)
        return xp.where(drop, -xp.inf, logits)


# ---------------------------------------------------------------------------------------------
# One request's decode: a `TokenSequence` (greedy, nucleus) or a `BeamSequence`, fed its rows' logits.


class DecodeSequence:
    """One request's decoding state: the rows it holds in a running batch and the tokens chosen so far.

    `advance` takes the (rows, V) logits of this sequence's rows and returns, for each of its next
    rows, the row of these logits it continues (None: the same rows, in order); `next_tokens` are
    then fed to those rows. `done` ends it; `result()` is its token ids (the stop token included).
    """

    rows: int  # rows it holds in the batch
    next_tokens: Any  # (rows,) tokens fed at the next step, the runtime's int64 array
    emitted: list[int]  # tokens settled by the last advance (streamed); a beam settles none until done
    done: bool = False

    def __init__(self, max_tokens: int, stop: tuple[int, ...]):
        self.max_tokens = max_tokens
        self.stop = stop  # stop token ids (empty: ignore_stop)
        self.stop_ids = set(stop)
        self.rows, self.emitted = 1, []

    def advance(self, logits: Any) -> Any | None:
        raise NotImplementedError

    def result(self) -> list[int]:
        raise NotImplementedError


class TokenSequence(DecodeSequence):
    """Greedy decoding, or nucleus sampling with its own generator: one row, one token per step."""

    def __init__(self, max_tokens: int, stop: tuple[int, ...], processors: list | None = None,
                 generator: np.random.Generator | None = None):
        super().__init__(max_tokens, stop)
        self.processors, self.generator = processors, generator  # None: greedy
        self.tokens: list[int] = []

    def advance(self, logits: Any) -> None:
        xp = arrays.namespace(logits)
        if self.generator is None:
            token = int(xp.argmax(logits[0]))
        else:
            for process in self.processors:
                logits = process(logits)
            token = self._sample(xp, arrays.softmax(logits[0]))
        self.tokens.append(token)
        self.emitted = [token]
        self.done = len(self.tokens) == self.max_tokens or token in self.stop_ids
        self.next_tokens = xp.asarray([token], dtype=xp.int64, device=arrays.device(logits))
        return None

    def _sample(self, xp, probs: Any) -> int:
        """Inverse CDF: the first kept token whose cumulative probability, in vocabulary order, exceeds a
        host-side uniform; the search runs where `probs` are and only the token id is read back."""
        cumulative = xp.cumulative_sum(probs)
        count = xp.sum(xp.astype(cumulative <= self.generator.random() * cumulative[-1], xp.int64))
        # Rounding may put the uniform at the total: the last kept token then (the first at the total).
        last_kept = xp.argmax(xp.astype(cumulative >= cumulative[-1], xp.int8))
        return int(xp.minimum(count, last_kept))

    def result(self) -> list[int]:
        return self.tokens


class BeamSequence(DecodeSequence):
    """The paper's `generate_beam` for one image: `beam_size` rows, scores are length-normalised log-probs.

    A stopped beam extends only by token 0 at no cost and stops growing in length, exactly as the
    paper's code does, so results match it beam for beam.
    """

    def __init__(self, max_tokens: int, stop: tuple[int, ...], beam_size: int, temperature: float):
        super().__init__(max_tokens, stop)
        self.beam_size, self.temperature = beam_size, temperature
        self.steps = 0

    def advance(self, logits: Any) -> Any:
        xp = arrays.namespace(logits)
        logprobs = xp.astype(arrays.log_softmax(scaled_logits(logits, self.temperature)), xp.float32)  # (rows, V)
        k, on = self.beam_size, arrays.device(logits)
        if self.steps == 0:  # the prefix's one row -> k beams
            self.stop_array = xp.asarray(self.stop, dtype=xp.int64, device=on)
            scores, first = arrays.topk(logprobs[0], k)
            self.sequences = first[:, None]  # (K, 1)
            self.scores = scores
            self.lengths = xp.ones(k, dtype=xp.float32, device=on)
            self.stopped = arrays.isin(first, self.stop_array)
            source = xp.zeros(k, dtype=xp.int64, device=on)
        else:
            vocab = logprobs.shape[-1]
            # A stopped beam extends only by token 0, at no cost.
            stopped_row = xp.full((vocab,), -xp.inf, dtype=xp.float32, device=on)
            stopped_row[0] = 0.0
            logprobs = xp.where(self.stopped[:, None], stopped_row[None], logprobs)
            lengths = self.lengths + xp.astype(~self.stopped, xp.float32)
            average = (self.scores[:, None] + logprobs) / lengths[:, None]  # (K, V)
            best, flat = arrays.topk(xp.reshape(average, (-1,)), k)  # (K,)
            source = flat // vocab  # the beams the new ones extend
            new_tokens = flat % vocab
            self.lengths = xp.take(lengths, source, axis=0)
            self.scores = best * self.lengths
            self.sequences = xp.concat((xp.take(self.sequences, source, axis=0), new_tokens[:, None]), axis=1)
            self.stopped = xp.take(self.stopped, source, axis=0) | arrays.isin(new_tokens, self.stop_array)
        self.steps += 1
        self.rows = k
        self.next_tokens = self.sequences[:, -1]
        self.done = self.steps == self.max_tokens or bool(xp.all(self.stopped))
        self.emitted = self.result() if self.done else []
        return source

    def result(self) -> list[int]:
        xp = arrays.namespace(self.scores)
        best = int(xp.argmax(self.scores / self.lengths))
        return self.sequences[best, : int(self.lengths[best])].tolist()


def new_sequence(options: DecodingOptions, stop: tuple[int, ...], max_tokens: int, seed: int | None = None,
                 ) -> DecodeSequence:
    """The sequence for one request of `options`; `seed`: nucleus (None: a random one)."""
    if options.strategy == "beam":
        return BeamSequence(max_tokens, stop, options.beam_size, options.temperature)
    if options.strategy == "nucleus":
        seed = seed if seed is not None else secrets.randbelow(2**62)
        return TokenSequence(max_tokens, stop, [Temperature(options.temperature), TopP(options.top_p)],
                             np.random.Generator(np.random.PCG64(seed)))
    return TokenSequence(max_tokens, stop)


class DecodeBatch:
    """Sequences decoding together on one runtime: each joins after its prefix step and leaves when done.

    The cache holds every live row's history; `next_tokens` of every live sequence are pending for the
    next `step`. Rows are kept in sequence order, each sequence's rows together.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.sequences: list[DecodeSequence] = []
        self.cache = None

    @property
    def rows(self) -> int:
        return sum(sequence.rows for sequence in self.sequences)

    def add(self, sequences: list[DecodeSequence], prefix: Any) -> list[DecodeSequence]:
        """Run the prefix step of new sequences, one (1, P, E) prefix row each, and join the batch;
        returns those already done after their first token."""
        logits, cache = self.runtime.step(prefix, self.runtime.new_cache(len(sequences)))
        self.xp, self.device = arrays.namespace(logits), arrays.device(logits)  # the runtime's arrays
        cache, kept = self._advance(sequences, logits, cache, [1] * len(sequences))
        if kept:
            self.cache = cache if self.cache is None else self.runtime.join(self.cache, cache)
            self.sequences += kept
        return [sequence for sequence in sequences if sequence.done]

    def step(self) -> list[DecodeSequence]:
        """One decode step for every live row; returns the sequences that finished."""
        tokens = self.xp.concat([sequence.next_tokens for sequence in self.sequences])
        logits, self.cache = self.runtime.step(self.runtime.embed(tokens[:, None]), self.cache)
        rows = [sequence.rows for sequence in self.sequences]
        before = self.sequences
        self.cache, self.sequences = self._advance(before, logits, self.cache, rows)
        if not self.sequences:
            self.cache = None
        return [sequence for sequence in before if sequence.done]

    def remove(self, leaving: list[DecodeSequence]) -> None:
        """Drop the rows of `leaving` (cancelled, expired) before the next step."""
        index, offset, kept = [], 0, []
        for sequence in self.sequences:
            if sequence not in leaving:
                index += range(offset, offset + sequence.rows)
                kept.append(sequence)
            offset += sequence.rows
        if len(kept) != len(self.sequences):
            self.sequences = kept
            self.cache = self._select(self.cache, index, offset) if kept else None

    def _advance(self, sequences: list[DecodeSequence], logits: Any, cache, rows: list[int]):
        """Each sequence takes its rows' logits; the cache keeps the rows of those not done, reordered as
        they ask (beams), and the live sequences in order."""
        index, offset, kept = [], 0, []
        for sequence, count in zip(sequences, rows):
            source = sequence.advance(logits[offset:offset + count])
            if not sequence.done:
                index += range(offset, offset + count) if source is None else (source + offset).tolist()
                kept.append(sequence)
            offset += count
        return (self._select(cache, index, offset) if kept else None), kept

    def _select(self, cache, index: list[int], rows: int):
        if index == list(range(rows)):
            return cache
        return self.runtime.select(cache, self.xp.asarray(index, dtype=self.xp.int64, device=self.device))


# ---------------------------------------------------------------------------------------------
# The one decoding entry point for a batch of images that start together.


def generate(runtime: Runtime, prefix: Any, options: DecodingOptions, stop_token_ids: list[int],
             max_tokens: int, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """(B, P, E) prefix embeddings -> B token-id lists, each ending with its stop token if one came.

    `max_tokens` is the resolved limit (options.max_tokens or the bundle default). `seeds`: nucleus
    only, one seed per row (a caller that splits a longer list into batches passes each row's own
    seed, so captions do not depend on the split); None: row i samples with `options.seed + i`.
    """
    if not options.use_cache:
        runtime = NoCacheRuntime(runtime)
    stop = stop_ids(stop_token_ids, options)
    row_seeds = _row_seeds(options, prefix.shape[0], seeds) if options.strategy == "nucleus" else [None] * len(prefix)
    sequences = [new_sequence(options, stop, max_tokens, seed) for seed in row_seeds]
    batch = DecodeBatch(runtime)
    batch.add(sequences, prefix)
    while batch.sequences:
        batch.step()
    return [sequence.result() for sequence in sequences]


def stop_ids(stop_token_ids: list[int], options: DecodingOptions) -> tuple[int, ...]:
    return () if options.ignore_stop else tuple(stop_token_ids)


def _row_seeds(options: DecodingOptions, batch_size: int, seeds: Sequence[int] | None = None) -> list[int]:
    """The seed each row samples with: `seeds` when given (checked), else options.seed + row index
    (a random base when options.seed is None)."""
    if seeds is None:
        base = options.seed if options.seed is not None else secrets.randbelow(2**62)
        return [base + row for row in range(batch_size)]
    seeds = list(seeds)
    if len(seeds) != batch_size:
        raise DecodingError(f"seeds: one per row expected, got {len(seeds)} for {batch_size} rows")
    bad = [seed for seed in seeds if not (is_int(seed) and 0 <= seed < 2**63)]
    if bad:
        raise DecodingError(f"seeds must be non-negative integers below 2**63, got {quote(bad[0])}")
    return seeds


class NoCacheRuntime:
    """Wraps a runtime into the paper's decoding: no KV cache, the whole sequence re-run every step.

    Its "cache" is the embedding sequence so far; `step` appends and runs the full sequence.
    """

    def __init__(self, runtime: Runtime):
        self.inner = runtime

    def new_cache(self, batch_size: int) -> Any | None:
        return None

    def embed(self, token_ids: Any) -> Any:
        return self.inner.embed(token_ids)

    def step(self, embeds: Any, cache: Any | None) -> tuple[Any, Any]:
        xp = arrays.namespace(embeds)  # the runtime's (the prefix, the first `cache`, may be the caller's)
        sequence = embeds if cache is None else xp.concat((xp.asarray(cache), embeds), axis=1)
        logits, _ = self.inner.step(sequence, self.inner.new_cache(sequence.shape[0]))
        return logits, sequence

    def select(self, cache: Any, index: Any) -> Any:
        xp = arrays.namespace(cache)
        return xp.take(cache, xp.asarray(index), axis=0)
