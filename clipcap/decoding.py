"""Caption decoding over any `Runtime`: greedy, beam search and nucleus sampling, batched, with a KV cache.

Each request is a `DecodeSequence` (its strategy's state, fed its rows' logits); a `DecodeBatch` steps
any mix of them together, letting one join after its prefix step and leave when done. `generate`
(images that start together) and the serving engine (iteration-level batching) both run on it, and
it only calls `runtime.step / embed / new_cache / select / join`, so every backend (torch,
onnxruntime, TensorRT) shares this one implementation. `NoCacheRuntime` wraps any runtime into the
paper's decoding (the whole sequence recomputed every step): the parity reference and the
benchmark baseline.
"""
from __future__ import annotations

from typing import Sequence

import torch

from clipcap.decoding_options import (REQUEST_OPTIONS, STRATEGIES, USED_BY, DecodingError, DecodingOptions, check_used,
                                      is_int)
from clipcap.quoting import quote
from clipcap.runtimes.base import Runtime

# The options live in clipcap.decoding_options (torch-free); they are imported from here as well.
__all__ = ["REQUEST_OPTIONS", "STRATEGIES", "USED_BY", "BeamSequence", "DecodeBatch", "DecodeSequence", "DecodingError",
           "DecodingOptions", "NoCacheRuntime", "Temperature", "TokenSequence", "TopP", "check_used", "generate",
           "new_sequence", "scaled_logits", "stop_tensor"]


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
# One request's decode: a `TokenSequence` (greedy, nucleus) or a `BeamSequence`, fed its rows' logits.


class DecodeSequence:
    """One request's decoding state: the rows it holds in a running batch and the tokens chosen so far.

    `advance` takes the (rows, V) logits of this sequence's rows and returns, for each of its next
    rows, the row of these logits it continues (None: the same rows, in order); `next_tokens` are
    then fed to those rows. `done` ends it; `result()` is its token ids (the stop token included).
    """

    rows: int  # rows it holds in the batch
    next_tokens: torch.Tensor  # (rows,) tokens fed at the next step
    emitted: list[int]  # tokens settled by the last advance (streamed); a beam settles none until done
    done: bool = False

    def __init__(self, max_tokens: int, stop: torch.Tensor):
        self.max_tokens = max_tokens
        self.stop = stop  # stop token ids (empty: ignore_stop)
        self.stop_ids = set(stop.tolist())
        self.rows, self.emitted = 1, []

    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def result(self) -> list[int]:
        raise NotImplementedError


class TokenSequence(DecodeSequence):
    """Greedy decoding, or nucleus sampling with its own generator: one row, one token per step."""

    def __init__(self, max_tokens: int, stop: torch.Tensor, processors: list | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(max_tokens, stop)
        self.processors, self.generator = processors, generator  # None: greedy
        self.tokens: list[int] = []

    def advance(self, logits: torch.Tensor) -> None:
        if self.generator is None:
            token = int(logits[0].argmax())
        else:
            for process in self.processors:
                logits = process(logits)
            token = int(torch.multinomial(logits[0].softmax(-1).cpu(), 1, generator=self.generator))
        self.tokens.append(token)
        self.emitted = [token]
        self.done = len(self.tokens) == self.max_tokens or token in self.stop_ids
        self.next_tokens = torch.tensor([token], device=logits.device)
        return None

    def result(self) -> list[int]:
        return self.tokens


class BeamSequence(DecodeSequence):
    """The paper's `generate_beam` for one image: `beam_size` rows, scores are length-normalised log-probs.

    A stopped beam extends only by token 0 at no cost and stops growing in length, exactly as the
    paper's code does, so results match it beam for beam.
    """

    def __init__(self, max_tokens: int, stop: torch.Tensor, beam_size: int, temperature: float):
        super().__init__(max_tokens, stop)
        self.beam_size, self.temperature = beam_size, temperature
        self.steps = 0

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        logprobs = scaled_logits(logits, self.temperature).log_softmax(-1).float()  # (rows, V)
        k = self.beam_size
        if self.steps == 0:  # the prefix's one row -> k beams
            scores, first = logprobs[0].topk(k)
            self.sequences = first[:, None]  # (K, 1)
            self.scores = scores
            self.lengths = torch.ones(k, device=logits.device)
            self.stopped = torch.isin(first, self.stop)
            source = torch.zeros(k, dtype=torch.long, device=logits.device)
        else:
            vocab = logprobs.shape[-1]
            logprobs[self.stopped] = float("-inf")
            logprobs[self.stopped, 0] = 0.0
            lengths = self.lengths + (~self.stopped).float()
            average = (self.scores[:, None] + logprobs) / lengths[:, None]  # (K, V)
            best, flat = average.view(-1).topk(k)  # (K,)
            source = flat // vocab  # the beams the new ones extend
            new_tokens = flat % vocab
            self.lengths = lengths[source]
            self.scores = best * self.lengths
            self.sequences = torch.cat((self.sequences[source], new_tokens[:, None]), dim=1)
            self.stopped = self.stopped[source] | torch.isin(new_tokens, self.stop)
        self.steps += 1
        self.rows = k
        self.next_tokens = self.sequences[:, -1]
        self.done = self.steps == self.max_tokens or bool(self.stopped.all())
        self.emitted = self.result() if self.done else []
        return source

    def result(self) -> list[int]:
        best = int((self.scores / self.lengths).argmax())
        return self.sequences[best, : int(self.lengths[best])].tolist()


def new_sequence(options: DecodingOptions, stop: torch.Tensor, max_tokens: int, seed: int | None = None,
                 ) -> DecodeSequence:
    """The sequence for one request of `options`; `seed`: nucleus (None: a random one)."""
    if options.strategy == "beam":
        return BeamSequence(max_tokens, stop, options.beam_size, options.temperature)
    if options.strategy == "nucleus":
        seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        return TokenSequence(max_tokens, stop, [Temperature(options.temperature), TopP(options.top_p)],
                             torch.Generator().manual_seed(seed))
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

    def add(self, sequences: list[DecodeSequence], prefix: torch.Tensor) -> list[DecodeSequence]:
        """Run the prefix step of new sequences, one (1, P, E) prefix row each, and join the batch;
        returns those already done after their first token."""
        self.device = prefix.device  # the runtime's (wrappers of runtimes need not say)
        logits, cache = self.runtime.step(prefix, self.runtime.new_cache(len(sequences)))
        cache, kept = self._advance(sequences, logits, cache, [1] * len(sequences))
        if kept:
            self.cache = cache if self.cache is None else self.runtime.join(self.cache, cache)
            self.sequences += kept
        return [sequence for sequence in sequences if sequence.done]

    def step(self) -> list[DecodeSequence]:
        """One decode step for every live row; returns the sequences that finished."""
        tokens = torch.cat([sequence.next_tokens for sequence in self.sequences])
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

    def _advance(self, sequences: list[DecodeSequence], logits: torch.Tensor, cache, rows: list[int]):
        """Each sequence takes its rows' logits; the cache keeps the rows of those not done, reordered as
        they ask (beams), and the live sequences in order."""
        index, offset, kept = [], 0, []
        for sequence, count in zip(sequences, rows):
            source = sequence.advance(logits[offset:offset + count])
            if not sequence.done:
                index += range(offset, offset + count) if source is None else (source.cpu() + offset).tolist()
                kept.append(sequence)
            offset += count
        return (self._select(cache, index, offset) if kept else None), kept

    def _select(self, cache, index: list[int], rows: int):
        if index == list(range(rows)):
            return cache
        return self.runtime.select(cache, torch.tensor(index, device=self.device))


# ---------------------------------------------------------------------------------------------
# The one decoding entry point for a batch of images that start together.


def generate(runtime: Runtime, prefix: torch.Tensor, options: DecodingOptions, stop_token_ids: list[int],
             max_tokens: int, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """(B, P, E) prefix embeddings -> B token-id lists, each ending with its stop token if one came.

    `max_tokens` is the resolved limit (options.max_tokens or the bundle default). `seeds`: nucleus
    only, one seed per row (a caller that splits a longer list into batches passes each row's own
    seed, so captions do not depend on the split); None: row i samples with `options.seed + i`.
    """
    if not options.use_cache:
        runtime = NoCacheRuntime(runtime)
    stop = stop_tensor(stop_token_ids, options, prefix.device)
    row_seeds = _row_seeds(options, prefix.shape[0], seeds) if options.strategy == "nucleus" else [None] * len(prefix)
    sequences = [new_sequence(options, stop, max_tokens, seed) for seed in row_seeds]
    batch = DecodeBatch(runtime)
    batch.add(sequences, prefix)
    while batch.sequences:
        batch.step()
    return [sequence.result() for sequence in sequences]


def stop_tensor(stop_token_ids: list[int], options: DecodingOptions, device: torch.device) -> torch.Tensor:
    return torch.tensor([] if options.ignore_stop else stop_token_ids, dtype=torch.long, device=device)


def _row_seeds(options: DecodingOptions, batch_size: int, seeds: Sequence[int] | None = None) -> list[int]:
    """The seed each row samples with: `seeds` when given (checked), else options.seed + row index
    (a random base when options.seed is None)."""
    if seeds is None:
        base = options.seed if options.seed is not None else int(torch.randint(0, 2**62, ()).item())
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
