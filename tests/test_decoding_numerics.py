"""Every float option over the whole float range, in the library and the CLI: a caption of
real tokens or a clean refusal. Tiny temperatures are the greedy limit, computed stably."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipcap.cli import main
from clipcap.decoding import (STRATEGIES, DecodingError, DecodingOptions, Temperature, TopP, generate, new_sequence,
                              scaled_logits)
from clipcap.formats.model_bundle import load_bundle
from clipcap.images import preprocess
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import random_images

# Every float hypothesis draws (subnormals, +-0, +-inf, nan, huge) and the edges a hostile client's probe hit.
FLOATS = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(
    [5e-324, 1e-320, 1e-45, 1e-38, 1e-30, 1e-8, 1.0, 10.0, 10.000001, 1e308, -0.0, -1e-38, math.nan, math.inf])
TOKENS = 6
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _in_range(temperature: float, top_p: float) -> bool:
    return 0 < temperature <= DecodingOptions.MAX_TEMPERATURE and 0 < top_p <= 1


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    runtime = TorchRuntime(bundle.model)
    clip = bundle.config.clip
    prefix = runtime.encode(preprocess(random_images(3), clip.image_size, clip.mean, clip.std))
    greedy = generate(runtime, prefix, DecodingOptions(), bundle.config.tokenizer.stop_token_ids, TOKENS)
    return bundle, runtime, prefix, greedy


@given(temperature=st.floats(min_value=5e-324, max_value=10.0), seed=st.integers(0, 2**32))
def test_scaled_logits_are_finite_at_the_top_and_never_nan(temperature, seed):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * 30
    scaled = scaled_logits(logits, temperature)
    assert not scaled.isnan().any()
    assert (scaled.amax(-1) == 0).all()  # each row's top token, whatever the temperature
    probs = scaled.softmax(-1)
    assert not probs.isnan().any() and torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (probs.argmax(-1) == logits.argmax(-1)).all()
    kept = TopP(0.5)(Temperature(temperature)(logits))
    assert kept.isfinite().any(-1).all()  # top_p always keeps at least the top token


@pytest.mark.parametrize("strategy", STRATEGIES)
@SETTINGS
@given(temperature=FLOATS, top_p=FLOATS)
def test_library_any_float_gives_real_tokens_or_a_clean_refusal(setup, strategy, temperature, top_p):
    bundle, runtime, prefix, greedy = setup
    options = DecodingOptions(strategy=strategy, beam_size=3, temperature=temperature, top_p=top_p, seed=5)
    if not _in_range(temperature, top_p):
        with pytest.raises(DecodingError, match="temperature|top_p"):
            options.validate(token_limit=TOKENS)
        return
    options.validate(token_limit=TOKENS)
    tokens = generate(runtime, prefix, options, bundle.config.tokenizer.stop_token_ids, TOKENS)
    assert all(1 <= len(row) <= TOKENS and all(0 <= t < bundle.config.gpt2.vocab_size for t in row) for row in tokens)
    if temperature < 1e-30:  # the greedy limit, beam and nucleus alike (ties aside: random weights have none)
        assert tokens == greedy


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=FLOATS, top_p=FLOATS)
def test_cli_any_float_gives_captions_or_exit_2(tiny_bundle, tmp_path_factory, capsys, strategy, temperature, top_p):
    embeddings = tmp_path_factory.getbasetemp() / "numerics-embeddings.npy"
    if not embeddings.exists():
        np.save(embeddings, np.random.default_rng(0).standard_normal((2, 24)).astype(np.float32))
    # Each strategy gets the flags it uses; greedy uses neither float, so --temperature is refused by name.
    used = {"greedy": [], "beam": ["--beam-size", "3"], "nucleus": ["--seed", "3", f"--top-p={top_p!r}"]}[strategy]
    code = main(["caption-embeddings", str(tiny_bundle), str(embeddings), "--json", "--decoding", strategy,
                 "--max-tokens", str(TOKENS), f"--temperature={temperature!r}", *used])  # "=": -1e-38 is a value
    out, err = capsys.readouterr()
    if strategy == "greedy" or not _in_range(temperature, top_p if strategy == "nucleus" else 0.5):
        assert code == 2 and ("temperature" in err or "top_p" in err), err
        return
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(1 <= len(row["token_ids"]) <= TOKENS for row in rows)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), temperature=st.sampled_from([0.3, 1.0, 2.5]),
       top_p=st.sampled_from([0.5, 0.9, 1.0]))
def test_nucleus_draws_the_same_tokens_from_numpy_and_torch_logits(seed, temperature, top_p):
    """One seed, one token sequence, whichever array library the runtime hands decoding (the uniforms are
    drawn host-side by numpy's PCG64; the inverse CDF runs where the logits are)."""
    logits = (np.random.default_rng(seed % 2**32).normal(size=(12, 1, 50)) * 3).astype(np.float32)
    options = DecodingOptions(strategy="nucleus", temperature=temperature, top_p=top_p)
    drawn = {}
    for name, convert in (("numpy", np.asarray), ("torch", torch.from_numpy)):
        sequence = new_sequence(options, (), len(logits), seed)
        for step in logits:
            sequence.advance(convert(step))
        drawn[name] = sequence.result()
    assert drawn["numpy"] == drawn["torch"]


def test_nucleus_samples_follow_the_kept_probabilities():
    """top_p 0.9 over (0.5, 0.3, 0.15, 0.05) keeps the first three (0.8 before the third, 0.95 before the
    fourth); 4,000 seeded draws land on them in proportion (atol: about four binomial deviations)."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sequence = new_sequence(DecodingOptions(strategy="nucleus", top_p=0.9), (), 4000, seed=0)
    for _ in range(4000):
        sequence.advance(np.log(probs)[None])
    frequencies = np.bincount(sequence.result(), minlength=4) / 4000
    assert frequencies[3] == 0
    assert np.allclose(frequencies[:3], probs[:3] / 0.95, atol=0.03)
