"""Rows that join a running decode (clipcap.decoding.DecodeBatch) caption as they do alone.

Each request of a schedule joins after some steps of the ones before it, with its own strategy, so
rows of different lengths, beams and sampled rows share steps; the backends pad them as their caches
do (torch and the concat decoder on the left with a mask, the in-place decoder on the right). The
check is tests/test_batch_invariance.py's: wherever a request reaches a token history it also reached
alone, its logits agree within the fp32 rounding bound, and a caption that differs must be what
decoding alone gives on the batch's own logits (a near tie that rounding tipped, nothing else).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipcap.decoding import BeamSequence, DecodeBatch, generate, new_sequence, stop_ids
from test_batch_invariance import OPTIONS, POOL, SEED, Checker, Recorder, copy, max_diff

PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["torch", "onnxruntime-in-place", "onnxruntime-concat"])
def checker(request, tiny_bundle, tiny_export, tiny_concat_export):
    bundle = {"torch": tiny_bundle, "onnxruntime-in-place": tiny_export, "onnxruntime-concat": tiny_concat_export}
    return Checker(bundle[request.param], "torch" if request.param == "torch" else "onnxruntime")


def recording(sequence) -> dict:
    """Wrap `sequence.advance` to remember the logits each of its rows saw, by the row's token history."""
    seen = {}
    advance = sequence.advance

    def recorded(logits):
        if isinstance(sequence, BeamSequence):
            histories = [()] if sequence.steps == 0 else [tuple(row) for row in sequence.sequences.tolist()]
        else:
            histories = [tuple(sequence.tokens)]
        for history, row in zip(histories, logits):
            seen[history] = copy(row)
        return advance(logits)

    sequence.advance = recorded
    return seen


schedules = st.lists(st.tuples(st.integers(0, POOL - 1), st.sampled_from(sorted(OPTIONS)), st.integers(0, 3)),
                     min_size=2, max_size=5)


@PROPERTY
@given(schedule=schedules)
def test_rows_joining_a_running_decode_caption_as_alone(checker, schedule):
    runtime = checker.captioner.runtime
    stop = stop_ids(checker.stop, OPTIONS["greedy"])
    batch, joined = DecodeBatch(runtime), []
    for image, strategy, wait in schedule:
        for _ in range(wait):
            if batch.sequences:
                batch.step()
        sequence = new_sequence(OPTIONS[strategy], stop, checker.max_tokens, SEED + image)
        joined.append((image, strategy, sequence, recording(sequence)))
        batch.add([sequence], runtime.encode(checker.pixels[[image]]))
    while batch.sequences:
        batch.step()
    for image, strategy, sequence, seen in joined:
        alone_tokens, alone_seen = checker.alone(image, strategy, SEED + image)
        shared = seen.keys() & alone_seen.keys()
        assert () in shared
        worst = max(max_diff(seen[h], alone_seen[h]) for h in shared)
        assert worst <= checker.bound, (strategy, schedule, worst)
        if sequence.result() != alone_tokens:
            replay = Recorder(runtime, 1, replace=seen)
            prefix = runtime.encode(checker.pixels[[image]])
            assert generate(replay, prefix, OPTIONS[strategy], checker.stop, checker.max_tokens,
                            [SEED + image])[0] == sequence.result(), (strategy, schedule)


def test_a_removed_row_leaves_the_others_untouched(checker):
    """Rows removed mid-decode (cancelled) free their cache rows; the others caption as alone."""
    runtime = checker.captioner.runtime
    stop = stop_ids(checker.stop, OPTIONS["greedy"])
    batch = DecodeBatch(runtime)
    sequences = [new_sequence(OPTIONS[s], stop, checker.max_tokens, SEED + i) for i, s in
                 enumerate(["greedy", "beam", "greedy", "nucleus"])]
    batch.add(sequences, runtime.encode(checker.pixels[[0, 1, 2, 3]]))
    batch.step()
    batch.remove([sequences[1], sequences[2]])
    assert batch.sequences == [s for s in (sequences[0], sequences[3]) if not s.done]
    assert batch.rows == len(batch.sequences)
    while batch.sequences:
        batch.step()
    for image, strategy in ((0, "greedy"), (3, "nucleus")):
        assert sequences[image].result() == checker.alone(image, strategy, SEED + image)[0]
