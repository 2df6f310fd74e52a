"""Decoding over the torch runtime: cache vs no-cache, batched vs one-by-one, beam, nucleus, options."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.decoding import DecodingError, DecodingOptions, TopP, generate
from clipcap.formats.model_bundle import load_bundle
from clipcap.images import preprocess
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import random_images
from reference import paper_beam, paper_greedy


@pytest.fixture(scope="module", params=["tiny_bundle", "tiny_transformer_bundle"])
def setup(request):
    bundle = load_bundle(request.getfixturevalue(request.param))
    runtime = TorchRuntime(bundle.model)
    clip = bundle.config.clip
    prefix = runtime.encode(preprocess(random_images(8), clip.image_size, clip.mean, clip.std))
    return bundle, runtime, prefix, bundle.config.tokenizer.stop_token_ids


def test_rows_stop_at_different_steps(setup):
    _, runtime, prefix, stop = setup
    lengths = {len(ids) for ids in generate(runtime, prefix, DecodingOptions(), stop, 24)}
    assert len(lengths) > 1, "the fixture must exercise rows finishing at different steps"


def test_greedy_matches_paper_no_cache_reference(setup):
    bundle, runtime, prefix, stop = setup
    cached = generate(runtime, prefix, DecodingOptions(), stop, 24)
    uncached = generate(runtime, prefix, DecodingOptions(use_cache=False), stop, 24)
    reference = [paper_greedy(bundle.model, prefix[i], stop, 24) for i in range(len(prefix))]
    assert cached == uncached == reference
    for ids in cached:  # each row ends at its first stop token, or runs to the limit
        assert len(ids) == 24 or (ids[-1] in stop and not set(ids[:-1]) & set(stop))


def test_batched_equals_one_by_one(setup):
    _, runtime, prefix, stop = setup
    for options in (DecodingOptions(), DecodingOptions(strategy="beam", beam_size=3),
                    DecodingOptions(strategy="nucleus", seed=7)):
        batched = generate(runtime, prefix, options, stop, 24)
        if options.strategy == "nucleus":  # row i samples with seed + i
            single = [generate(runtime, prefix[i:i + 1], options.replace(seed=7 + i), stop, 24)[0]
                      for i in range(len(prefix))]
        else:
            single = [generate(runtime, prefix[i:i + 1], options, stop, 24)[0] for i in range(len(prefix))]
        assert batched == single, options.strategy


def test_beam_matches_paper_generate_beam(setup):
    bundle, runtime, prefix, stop = setup
    ours = generate(runtime, prefix, DecodingOptions(strategy="beam"), stop, 24)
    reference = [paper_beam(bundle.model, prefix[i], stop, 24) for i in range(len(prefix))]
    assert ours == reference
    assert ours == generate(runtime, prefix, DecodingOptions(strategy="beam", use_cache=False), stop, 24)


class PositionalLM:
    """A made-up language model that is both a `Runtime` and the paper's `model.gpt`: embeddings are one-hot
    token rows, the logits of position p are `embedding @ table[p]`. Position-dependent, so no two token
    orders tie (as they would in a Markov table), and flat enough that the temperature moves the beams."""

    VOCAB, STOP, POSITIONS = 8, [7], 16

    def __init__(self, seed: int):
        self.table = 2 * torch.randn(self.POSITIONS, self.VOCAB, self.VOCAB, generator=torch.Generator().manual_seed(seed))
        self.transformer = SimpleNamespace(wte=self.embed)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(token_ids, self.VOCAB).float()

    def new_cache(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, dtype=torch.long)  # the next position of each row

    def step(self, embeds: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = cache + embeds.shape[1] - 1
        return torch.einsum("bv,bvw->bw", embeds[:, -1], self.table[last]), cache + embeds.shape[1]

    def select(self, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cache[index]

    def __call__(self, inputs_embeds: torch.Tensor) -> SimpleNamespace:  # the paper's model.gpt(...)
        positions = inputs_embeds.shape[1]
        return SimpleNamespace(logits=torch.einsum("bnv,nvw->bnw", inputs_embeds, self.table[:positions]))

    def beams(self, temperature: float) -> list[list[int]]:
        prefix = self.embed(torch.arange(4)[:, None])  # four "images": start tokens 0..3
        options = DecodingOptions(strategy="beam", beam_size=3, temperature=temperature)
        return generate(self, prefix, options, self.STOP, 10)

    def paper_beams(self, temperature: float) -> list[list[int]]:
        prefix = self.embed(torch.arange(4)[:, None])
        model = SimpleNamespace(gpt=self)
        return [paper_beam(model, prefix[i], self.STOP, 10, beam_size=3, temperature=temperature) for i in range(4)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), temperature=st.sampled_from([0.5, 2.0]))
def test_beam_matches_paper_generate_beam_at_other_temperatures(seed, temperature):
    lm = PositionalLM(seed)
    assert lm.beams(temperature) == lm.paper_beams(temperature)


def test_the_temperature_moves_the_beams_of_the_made_up_model():
    """What makes the property above bite: at 0.5 and at 2.0 the beams differ from temperature 1's."""
    lm = PositionalLM(19)
    assert lm.beams(0.5) != lm.beams(1.0) != lm.beams(2.0)


def test_beam_of_one_is_greedy(setup):
    _, runtime, prefix, stop = setup
    assert generate(runtime, prefix, DecodingOptions(strategy="beam", beam_size=1), stop, 24) == \
        generate(runtime, prefix, DecodingOptions(), stop, 24)


def test_nucleus_is_reproducible_and_seed_dependent(setup):
    _, runtime, prefix, stop = setup
    options = DecodingOptions(strategy="nucleus", top_p=0.95, temperature=1.5, seed=1)
    first = generate(runtime, prefix, options, stop, 24)
    assert first == generate(runtime, prefix, options, stop, 24)
    others = [generate(runtime, prefix, options.replace(seed=s), stop, 24) for s in (2, 3, 4)]
    assert any(other != first for other in others)
    # A tiny top_p keeps only the most likely token: sampling becomes greedy.
    assert generate(runtime, prefix, options.replace(top_p=1e-6, temperature=1.0), stop, 24) == \
        generate(runtime, prefix, DecodingOptions(), stop, 24)


def test_row_seeds_are_checked(setup):
    _, runtime, prefix, stop = setup
    nucleus = DecodingOptions(strategy="nucleus", seed=3)
    with pytest.raises(DecodingError, match="one per row"):
        generate(runtime, prefix, nucleus, stop, 4, seeds=[1, 2])
    with pytest.raises(DecodingError, match="seeds must be non-negative"):
        generate(runtime, prefix[:2], nucleus, stop, 4, seeds=[1, -2])
    assert generate(runtime, prefix, nucleus, stop, 6) == \
        generate(runtime, prefix, nucleus, stop, 6, seeds=[3 + i for i in range(len(prefix))])


def test_ignore_stop_generates_exactly_max_tokens(setup):
    _, runtime, prefix, stop = setup
    out = generate(runtime, prefix, DecodingOptions(ignore_stop=True), stop, 9)
    assert all(len(ids) == 9 for ids in out)


def test_top_p_on_made_up_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = TopP(0.7)(probs.log()).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert TopP(0.5)(probs.log()).isfinite().tolist() == [[True, False, False, False]]
    shuffled = probs[:, [2, 0, 3, 1]]
    assert TopP(0.7)(shuffled.log()).isfinite().tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("options, message", [
    (DecodingOptions(strategy="topk"), "decoding must be one of"),
    (DecodingOptions(max_tokens=0), "max_tokens"),
    (DecodingOptions(max_tokens=41), "max_tokens"),
    (DecodingOptions(beam_size=17), "beam_size"),
    (DecodingOptions(top_p=0.0), "top_p"),
    (DecodingOptions(temperature=-1.0), "temperature"),
    (DecodingOptions(seed=-3), "seed"),
    (DecodingOptions(max_tokens=True), "max_tokens"),
])
def test_option_bounds(options, message):
    with pytest.raises(DecodingError, match=message):
        options.validate(token_limit=40)


def test_every_documented_maximum_is_accepted(setup):
    """The bounds are inclusive: beam_size 16, temperature 10, top_p 1, max_tokens = the token limit."""
    _, runtime, prefix, stop = setup
    beam = DecodingOptions(strategy="beam", beam_size=DecodingOptions.MAX_BEAM_SIZE,
                           temperature=DecodingOptions.MAX_TEMPERATURE, max_tokens=40).validate(token_limit=40)
    assert DecodingOptions.MAX_BEAM_SIZE == 16 and DecodingOptions.MAX_TEMPERATURE == 10.0
    assert len(generate(runtime, prefix[:1], beam, stop, 4)) == 1
    DecodingOptions(strategy="nucleus", top_p=1.0, seed=2**63 - 1).validate(token_limit=40)
    with pytest.raises(DecodingError, match="temperature"):
        DecodingOptions(temperature=10.000001).validate(token_limit=40)


def test_a_request_option_its_strategy_ignores_is_refused():
    defaults = DecodingOptions(max_tokens=20)
    for request, named in (({"beam_size": 3}, "beam_size is used only by decoding beam, not by decoding greedy"),
                           ({"decoding": "beam", "seed": 1}, "seed is used only by decoding nucleus"),
                           ({"temperature": 0.5}, "temperature is used only by decoding beam or nucleus"),
                           ({"decoding": "greedy", "top_p": 0.5}, "top_p is used only by decoding nucleus")):
        with pytest.raises(DecodingError, match=named):
            DecodingOptions.from_request(request, defaults)
    nucleus = DecodingOptions.from_request({"decoding": "nucleus", "seed": 1, "top_p": 0.5, "temperature": 2}, defaults)
    assert (nucleus.seed, nucleus.top_p, nucleus.temperature) == (1, 0.5, 2)
    # Defaults of another strategy are the server's, not the request's: a beam server takes a greedy request.
    assert DecodingOptions.from_request({"decoding": "greedy"}, defaults.replace(strategy="beam")).strategy == "greedy"


def test_request_options():
    defaults = DecodingOptions(max_tokens=20)
    options = DecodingOptions.from_request({"decoding": "beam", "beam_size": 3}, defaults)
    assert (options.strategy, options.beam_size, options.max_tokens) == ("beam", 3, 20)
    with pytest.raises(DecodingError, match="unknown option"):
        DecodingOptions.from_request({"url": "http://example.com"}, defaults)
