"""Decoding's loops (clipcap/decoding.py) over a fake runtime whose logits are scripted per row history.

The fake keeps, per cache row, the image id and the tokens fed so far; its logits are a function of
that history only, so what the loops should produce is computed here by hand or by a naive per-row
search. It also enforces the caller's side of the cache contract (clipcap/runtimes/base.py): a
spent cache given again fails the test.
"""
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.decoding import DecodingOptions, generate

VOCAB = 6
STOP = 5  # the stop token of these tests
IMAGE_BASE = 100  # prefix "embeddings" carry the image id + IMAGE_BASE: never confused with a token


class FakeCache:
    def __init__(self, histories: list[tuple[int, ...]]):
        self.histories = histories
        self.spent = False

    def spend(self) -> list[tuple[int, ...]]:
        assert not self.spent, "decoding gave a spent cache again (the Runtime contract forbids it)"
        self.spent = True
        return self.histories


class ScriptedRuntime:
    """`script(history) -> (VOCAB,) logits`; history = (image id, token, token, ...).

    `leaves_on`: tokens after which a row must have left the batch (greedy, nucleus); beam search keeps
    stopped beams in the batch, extending them at no cost, so its tests pass ().
    """

    device = torch.device("cpu")

    def __init__(self, script, leaves_on: tuple[int, ...] = (STOP,)):
        self.script = script
        self.leaves_on = leaves_on
        self.steps: list[list[tuple[int, ...]]] = []  # the histories stepped, per call

    def new_cache(self, batch_size: int) -> FakeCache:
        return FakeCache([() for _ in range(batch_size)])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids[..., None].float()  # (B, T) -> (B, T, 1): the id itself

    def step(self, embeds: torch.Tensor, cache: FakeCache) -> tuple[torch.Tensor, FakeCache]:
        histories = [history + tuple(int(v) for v in row[:, 0].tolist())
                     for history, row in zip(cache.spend(), embeds)]
        for history in histories:
            assert not set(tokens_of(history)) & set(self.leaves_on), f"a finished row was stepped: {history}"
        self.steps.append(histories)
        logits = torch.stack([torch.as_tensor(self.script(h), dtype=torch.float32) for h in histories])
        return logits, FakeCache(histories)

    def select(self, cache: FakeCache, index: torch.Tensor) -> FakeCache:
        histories = cache.spend()
        return FakeCache([histories[i] for i in index.tolist()])


def prefix_of(images: list[int]) -> torch.Tensor:
    return torch.tensor([[[float(IMAGE_BASE + image)]] for image in images])  # (B, P=1, E=1)


def image_of(history: tuple[int, ...]) -> int:
    return int(history[0]) - IMAGE_BASE


def tokens_of(history: tuple[int, ...]) -> tuple[int, ...]:
    return history[1:]


def log_probs(probs: dict[int, float]) -> list[float]:
    """Logits whose softmax is `probs` (tokens not named share what is left, or get ~0)."""
    rest = max(0.0, 1.0 - sum(probs.values()))
    others = VOCAB - len(probs)
    return [math.log(probs[t]) if t in probs else (math.log(rest / others) if rest > 0 else -1e9)
            for t in range(VOCAB)]


def random_script(seed: int):
    """Logits from a generator seeded by the history: distinct, tie-free, the same each time asked."""
    def script(history):
        key = zlib.crc32(repr((seed, history)).encode())
        return torch.randn(VOCAB, generator=torch.Generator().manual_seed(key)) * 2

    return script


def naive_greedy(script, image: int, max_tokens: int, stop=(STOP,)) -> list[int]:
    history, out = (IMAGE_BASE + image,), []
    for _ in range(max_tokens):
        token = int(torch.as_tensor(script(history)).argmax())
        out.append(token)
        history += (token,)
        if token in stop:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Greedy: stop rules and finished rows leaving the batch.


def test_greedy_stops_each_row_at_its_own_stop_and_drops_it():
    stop_after = {0: 2, 1: 4, 2: None}  # image -> tokens before its stop (None: never stops)

    def script(history):
        made = len(tokens_of(history))
        stops_at = stop_after[image_of(history)]
        return log_probs({STOP: 0.9} if made == stops_at else {1 + made % 4: 0.9})

    runtime = ScriptedRuntime(script)
    out = generate(runtime, prefix_of([0, 1, 2]), DecodingOptions(), [STOP], max_tokens=7)
    assert out == [[1, 2, STOP], [1, 2, 3, 4, STOP], [1, 2, 3, 4, 1, 2, 3]]
    # Rows leave the batch once they stop: 3 rows for the prefix and tokens 1-2, then 2 rows, then 1.
    assert [len(h) for h in runtime.steps] == [3, 3, 3, 2, 2, 1, 1]
    assert {image_of(h) for h in runtime.steps[-1]} == {2}


def test_ignore_stop_runs_every_row_to_max_tokens():
    runtime = ScriptedRuntime(lambda history: log_probs({STOP: 0.9}), leaves_on=())
    out = generate(runtime, prefix_of([0, 1]), DecodingOptions(ignore_stop=True), [STOP], max_tokens=4)
    assert out == [[STOP] * 4, [STOP] * 4]


def test_all_rows_stopping_ends_the_loop():
    runtime = ScriptedRuntime(lambda history: log_probs({STOP: 0.9}))
    assert generate(runtime, prefix_of([0, 1]), DecodingOptions(), [STOP], max_tokens=9) == [[STOP], [STOP]]
    assert len(runtime.steps) == 1  # the prefix step only: no token step for finished rows


def test_any_of_several_stop_tokens_stops():
    script = lambda history: log_probs({3 if image_of(history) == 0 else STOP: 0.9})  # noqa: E731
    out = generate(ScriptedRuntime(script, leaves_on=(3, STOP)), prefix_of([0, 1]), DecodingOptions(), [3, STOP],
                   max_tokens=5)
    assert out == [[3], [STOP]]


def test_greedy_ties_go_to_the_lowest_token_id():
    """Exactly equal logits: argmax keeps the first, in any batch composition."""
    script = lambda history: [0.0, 2.0, 1.0, 2.0, 2.0, -1.0]  # noqa: E731
    batched = generate(ScriptedRuntime(script), prefix_of([0, 1, 2]), DecodingOptions(), [STOP], max_tokens=3)
    alone = generate(ScriptedRuntime(script), prefix_of([1]), DecodingOptions(), [STOP], max_tokens=3)
    assert batched == [[1, 1, 1]] * 3 and alone == [[1, 1, 1]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), images=st.integers(1, 6), max_tokens=st.integers(1, 8))
def test_greedy_is_per_row_argmax_in_any_batch(seed, images, max_tokens):
    script = random_script(seed)
    out = generate(ScriptedRuntime(script), prefix_of(list(range(images))), DecodingOptions(), [STOP], max_tokens)
    assert out == [naive_greedy(script, image, max_tokens) for image in range(images)]
    no_cache = generate(ScriptedRuntime(script), prefix_of(list(range(images))), DecodingOptions(use_cache=False),
                        [STOP], max_tokens)
    assert no_cache == out


# ---------------------------------------------------------------------------------------------
# Beam search: length normalisation, stopped beams, ties.


def test_beam_normalises_by_length():
    """A stop at once (p 0.5, mean log-prob -0.69) against a longer caption whose total log-prob is lower
    (-1.87) but whose mean over its 5 tokens is higher (-0.37): beam keeps the longer one, greedy the stop."""
    def script(history):
        made = tokens_of(history)
        if not made:
            return log_probs({STOP: 0.5, 1: 0.5 - 1e-3})
        if len(made) < 4:
            return log_probs({1 + len(made): 0.7})
        return log_probs({STOP: 0.9})

    options = DecodingOptions(strategy="beam", beam_size=3)
    beam = generate(ScriptedRuntime(script, leaves_on=()), prefix_of([0]), options, [STOP], max_tokens=8)
    assert beam == [[1, 2, 3, 4, STOP]]
    assert generate(ScriptedRuntime(script), prefix_of([0]), DecodingOptions(), [STOP], max_tokens=8) == [[STOP]]


def test_beam_stopped_hypotheses_keep_their_length():
    """A beam that stopped at once (mean -0.60 over its 1 token) loses to [1, 2, stop] (mean -0.34). Were
    the stopped beam's length to grow with the steps it sits out, its mean would reach -0.20 and win."""
    def script(history):
        made = tokens_of(history)
        if not made:
            return log_probs({STOP: 0.55, 1: 0.44})
        return log_probs({2: 0.9} if made == (1,) else {STOP: 0.9})

    options = DecodingOptions(strategy="beam", beam_size=2)
    out = generate(ScriptedRuntime(script, leaves_on=()), prefix_of([0, 1]), options, [STOP], max_tokens=6)
    assert out == [[1, 2, STOP], [1, 2, STOP]]


def test_beam_ties_are_deterministic_and_batch_independent():
    """Two continuations with exactly equal scores at every step: the result is one of the best-scoring
    captions, the same on every run and whether the image is decoded alone or with others."""
    script = lambda history: log_probs({1: 0.4, 2: 0.4, STOP: 0.15})  # noqa: E731
    options = DecodingOptions(strategy="beam", beam_size=3)
    runs = [generate(ScriptedRuntime(script, leaves_on=()), prefix_of([0, 1, 2]), options, [STOP], max_tokens=4)
            for _ in range(3)]
    alone = generate(ScriptedRuntime(script, leaves_on=()), prefix_of([1]), options, [STOP], max_tokens=4)
    assert runs[0] == runs[1] == runs[2] and runs[0][1] == alone[0]
    best = max(math.log(0.4) * 4 / 4, (math.log(0.4) * 3 + math.log(0.15)) / 4)  # 4 words vs 3 words + stop
    for caption in runs[0]:
        assert set(caption[:-1]) <= {1, 2}
        score = sum(math.log(0.15) if t == STOP else math.log(0.4) for t in caption) / len(caption)
        assert score == pytest.approx(best)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), images=st.integers(1, 4), beam=st.integers(1, 4), max_tokens=st.integers(1, 6))
def test_beam_batched_equals_alone_and_beam_one_is_greedy(seed, images, beam, max_tokens):
    script = random_script(seed)
    options = DecodingOptions(strategy="beam", beam_size=beam)
    batched = generate(ScriptedRuntime(script, leaves_on=()), prefix_of(list(range(images))), options, [STOP],
                       max_tokens)
    alone = [generate(ScriptedRuntime(script, leaves_on=()), prefix_of([image]), options, [STOP], max_tokens)[0]
             for image in range(images)]
    assert batched == alone
    for caption in batched:
        assert 1 <= len(caption) <= max_tokens and STOP not in caption[:-1]
    if beam == 1:
        assert batched == [naive_greedy(script, image, max_tokens) for image in range(images)]


# ---------------------------------------------------------------------------------------------
# Nucleus sampling over the same fake.


def test_nucleus_with_a_tiny_top_p_is_greedy():
    script = random_script(7)
    options = DecodingOptions(strategy="nucleus", top_p=1e-6, seed=0)
    out = generate(ScriptedRuntime(script), prefix_of([0, 1, 2]), options, [STOP], max_tokens=6)
    assert out == [naive_greedy(script, image, 6) for image in range(3)]


def test_nucleus_rows_follow_their_own_seed():
    script = random_script(8)
    options = DecodingOptions(strategy="nucleus", top_p=0.95, temperature=2.0)
    together = generate(ScriptedRuntime(script), prefix_of([0, 1, 2]), options, [STOP], max_tokens=6, seeds=[4, 5, 6])
    apart = [generate(ScriptedRuntime(script), prefix_of([image]), options, [STOP], max_tokens=6, seeds=[4 + image])[0]
             for image in range(3)]
    assert together == apart
