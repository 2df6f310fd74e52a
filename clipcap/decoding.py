"""Caption decoding over any `Runtime`: greedy, beam search and nucleus sampling, batched, with a KV cache.

The loops only call `runtime.step / embed / new_cache / select`, so every backend (torch,
onnxruntime, TensorRT) shares this one implementation. `NoCacheRuntime` wraps any runtime into the
paper's decoding (the whole sequence recomputed every step): the parity reference and the
benchmark baseline.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipcap.decoding_options import (REQUEST_OPTIONS, STRATEGIES, USED_BY, DecodingError, DecodingOptions, check_used,
                                      is_int)
from clipcap.quoting import quote
from clipcap.runtimes.base import Runtime

# The options live in clipcap.decoding_options (torch-free); they are imported from here as well.
__all__ = ["REQUEST_OPTIONS", "STRATEGIES", "USED_BY", "DecodingError", "DecodingOptions", "NoCacheRuntime", "Temperature",
           "TopP", "check_used", "generate", "scaled_logits"]

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
    bad = [seed for seed in seeds if not (is_int(seed) and 0 <= seed < 2**63)]
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
