"""clipcap.json schema: round trip, clear errors naming the file and field, and (as properties over
generated small configs) validation passing exactly when the bundle builds and captions."""
import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from clipcap.captioner import Captioner
from clipcap.config import BundleError, ClipCapConfig
from clipcap.decoding import DecodingOptions
from clipcap.model import ClipCapModel
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import random_images


def test_round_trip(tmp_path):
    config = ClipCapConfig()
    config.save(tmp_path / "clipcap.json")
    assert ClipCapConfig.load(tmp_path / "clipcap.json") == config


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["mapper"].update(type="lstm"), "mapper.type"),
    (lambda d: d["gpt2"].update(n_embd="768"), "gpt2.n_embd"),
    (lambda d: d["gpt2"].update(n_head=5), "gpt2.n_head"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["clip"].update(mean=[0.5, 0.5]), "clip.mean"),
    (lambda d: d["tokenizer"].update(stop_token_ids=[99999]), "tokenizer.stop_token_ids"),
    (lambda d: d.update(max_tokens=5000), "max_tokens"),
    (lambda d: d.update(normalize_prefix=1), "normalize_prefix"),
    (lambda d: d.update(mapper=[]), "mapper"),
])
def test_bad_field_is_named(tmp_path, mutate, field):
    data = ClipCapConfig().to_dict()
    mutate(data)
    path = tmp_path / "clipcap.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError) as error:
        ClipCapConfig.load(path)
    assert str(path) in str(error.value) and field in str(error.value)


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "clipcap.json"
    with pytest.raises(BundleError, match="not found"):
        ClipCapConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        ClipCapConfig.load(path)


# Property: every clipcap.json that validates builds and captions; every one refused names its field.

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def valid_configs(draw) -> dict:
    """A small clipcap.json dict, consistent by construction (sizes tiny so building takes milliseconds)."""
    image_size = draw(st.integers(8, 32))
    embed_dim = draw(st.integers(1, 24))
    width_heads = draw(st.integers(1, 2))
    n_head = draw(st.integers(1, 3))
    n_embd = n_head * draw(st.integers(2, 8))
    mapper_heads = draw(st.sampled_from([d for d in range(1, 9) if n_embd % d == 0]))
    vocab_size = draw(st.integers(2, 320))
    prefix_length = draw(st.integers(1, 5))
    max_tokens = draw(st.integers(1, 8))
    return {
        "clip": {"model_name": "tiny", "image_size": image_size, "embed_dim": embed_dim,
                 "model_config": {"embed_dim": embed_dim, "vision_cfg": {
                     "image_size": image_size, "layers": 1, "width": 16 * width_heads,
                     "patch_size": draw(st.integers(1, image_size)), "head_width": 16}},
                 "mean": draw(st.lists(st.floats(0, 1), min_size=3, max_size=3)),
                 "std": draw(st.lists(st.floats(0.05, 1), min_size=3, max_size=3))},
        "mapper": {"type": draw(st.sampled_from(["mlp", "transformer"])), "prefix_length": prefix_length,
                   "clip_length": draw(st.integers(1, 4)), "num_layers": draw(st.integers(1, 2)),
                   "num_heads": mapper_heads, "mlp_ratio": draw(st.floats(0.5, 3))},
        "gpt2": {"vocab_size": vocab_size, "n_positions": prefix_length + max_tokens + draw(st.integers(0, 4)),
                 "n_embd": n_embd, "n_layer": draw(st.integers(1, 2)), "n_head": n_head},
        "tokenizer": {"eos_token_id": draw(st.integers(0, vocab_size - 1)),
                      "stop_token_ids": draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=2))},
        "normalize_prefix": draw(st.booleans()),
        "max_tokens": max_tokens,
    }


def _set(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


def _values_any_type():
    return st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2))


# Field path -> values a user might write there, right or wrong.
MUTATIONS = {
    "clip.image_size": st.integers(-1, 40),
    "clip.embed_dim": st.integers(-1, 30),
    "clip.mean": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
    "clip.std": st.lists(st.one_of(st.floats(-1, 2), st.sampled_from([math.nan, math.inf])), max_size=4),
    "clip.model_name": st.sampled_from(["tiny", "ViT-B-32", ""]),
    "clip.model_config": st.one_of(st.none(), st.just({}), st.just({"embed_dim": 24})),
    "clip.model_config.embed_dim": st.integers(-1, 30),
    "clip.model_config.vision_cfg.image_size": st.integers(-1, 40),
    "clip.model_config.vision_cfg.patch_size": st.integers(-1, 40),
    "clip.model_config.vision_cfg.width": st.integers(-1, 48),
    "clip.model_config.vision_cfg.head_width": st.integers(-1, 48),
    "clip.model_config.vision_cfg.layers": st.integers(-1, 2),
    "mapper.type": st.sampled_from(["mlp", "transformer", "lstm", ""]),
    "mapper.prefix_length": st.integers(-1, 12),
    "mapper.clip_length": st.integers(-1, 5),
    "mapper.num_layers": st.integers(-1, 3),
    "mapper.num_heads": st.integers(-1, 9),
    "mapper.mlp_ratio": st.one_of(st.floats(-1, 4), st.sampled_from([math.nan, math.inf])),
    "gpt2.vocab_size": st.integers(-1, 400),
    "gpt2.n_positions": st.integers(-1, 24),
    "gpt2.n_embd": st.integers(-1, 30),
    "gpt2.n_layer": st.integers(-1, 3),
    "gpt2.n_head": st.integers(-1, 6),
    "tokenizer.file": st.sampled_from(["tokenizer.json", "", "../tokenizer.json", "sub/tok.json"]),
    "tokenizer.eos_token_id": st.integers(-2, 400),
    "tokenizer.stop_token_ids": st.lists(st.integers(-2, 400), max_size=3),
    "max_tokens": st.integers(-1, 30),
    "format_version": st.integers(0, 2),
}


@st.composite
def mutated_configs(draw) -> tuple[dict, list[str]]:
    data = draw(valid_configs())
    paths = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2, unique=True))
    for path in paths:
        value = draw(st.one_of(MUTATIONS[path], _values_any_type()) if draw(st.booleans()) else MUTATIONS[path])
        try:
            _set(data, path, value)
        except (KeyError, TypeError):  # an earlier mutation removed or replaced the parent
            pass
    return data, paths


def _caption(config: ClipCapConfig, tokenizer) -> None:
    """Build the model and caption one image, generating exactly max_tokens (the longest it may run)."""
    torch.manual_seed(0)
    captioner = Captioner(TorchRuntime(ClipCapModel(config)), tokenizer, config)
    options = DecodingOptions(max_tokens=config.max_tokens, ignore_stop=True)
    captions = captioner.caption_images(random_images(1, size=20), options).captions
    assert [len(c.token_ids) for c in captions] == [config.max_tokens]
    assert all(0 <= t < config.gpt2.vocab_size for c in captions for t in c.token_ids)
    assert all(isinstance(c.caption, str) for c in captions)


@PROPERTY_SETTINGS
@given(valid_configs())
def test_generated_valid_configs_build_and_caption(tiny_tokenizer, data):
    _caption(ClipCapConfig.from_dict(json.loads(json.dumps(data))), tiny_tokenizer)


@PROPERTY_SETTINGS
@given(mutated_configs())
def test_config_validates_iff_it_runs(tiny_tokenizer, case):
    """validate() passes => builds and captions; refuses => the message names a field that was changed."""
    data, paths = case
    try:
        config = ClipCapConfig.from_dict(json.loads(json.dumps(data)))
    except BundleError as error:
        assert paths, f"an unmutated config was refused: {error}"
        assert any(path in str(error) for path in paths), (paths, str(error))
        return
    _caption(config, tiny_tokenizer)


def _non_divisor(draw, width: int) -> int:
    return draw(st.sampled_from([d for d in range(2, 2 * width + 2) if width % d]))


# Mutations that make a config unable to run, each with the field its refusal must name.
INVALID = {
    "mapper.num_heads": lambda d, draw: d["mapper"].update(type="transformer",
                                                           num_heads=_non_divisor(draw, d["gpt2"]["n_embd"])),
    "mapper.mlp_ratio": lambda d, draw: d["mapper"].update(
        type="transformer", mlp_ratio=draw(st.sampled_from([0.5 / d["gpt2"]["n_embd"], 0.0, math.nan, math.inf]))),
    "mapper.prefix_length": lambda d, draw: d["mapper"].update(prefix_length=d["gpt2"]["n_positions"]),
    "mapper.clip_length": lambda d, draw: d["mapper"].update(clip_length=draw(st.integers(-3, 0))),
    "mapper.num_layers": lambda d, draw: d["mapper"].update(num_layers=draw(st.integers(-3, 0))),
    "gpt2.n_head": lambda d, draw: d["gpt2"].update(n_head=_non_divisor(draw, d["gpt2"]["n_embd"])),
    "gpt2.n_positions": lambda d, draw: d["gpt2"].update(n_positions=d["mapper"]["prefix_length"]),
    "gpt2.n_embd": lambda d, draw: d["gpt2"].update(n_embd=str(d["gpt2"]["n_embd"])),
    "gpt2.vocab_size": lambda d, draw: d["gpt2"].update(
        vocab_size=max(d["tokenizer"]["stop_token_ids"] + [d["tokenizer"]["eos_token_id"]])),
    "max_tokens": lambda d, draw: d.update(max_tokens=d["gpt2"]["n_positions"] - d["mapper"]["prefix_length"] + 1),
    "tokenizer.eos_token_id": lambda d, draw: d["tokenizer"].update(
        eos_token_id=draw(st.sampled_from([-1, d["gpt2"]["vocab_size"]]))),
    "tokenizer.stop_token_ids": lambda d, draw: d["tokenizer"]["stop_token_ids"].append(d["gpt2"]["vocab_size"]),
    "tokenizer.file": lambda d, draw: d["tokenizer"].update(file=draw(st.sampled_from(["", "../t.json", "a/t.json"]))),
    "clip.embed_dim": lambda d, draw: d["clip"].update(embed_dim=d["clip"]["embed_dim"] + draw(st.integers(1, 5))),
    "clip.image_size": lambda d, draw: d["clip"].update(image_size=d["clip"]["image_size"] + draw(st.integers(1, 5))),
    "clip.mean": lambda d, draw: d["clip"].update(mean=draw(st.sampled_from([[0.5], [0.5] * 4, [0.5, math.nan, 0.5]]))),
    "clip.std": lambda d, draw: d["clip"].update(std=draw(st.sampled_from([[0.5, 0.0, 0.5], [0.5, -1.0, 0.5]]))),
    "clip.model_config": lambda d, draw: d["clip"].update(model_config=None, model_name="no-such-model"),
    "clip.model_config.embed_dim": lambda d, draw: d["clip"]["model_config"].update(embed_dim=None),
    "clip.model_config.vision_cfg.patch_size": lambda d, draw: d["clip"]["model_config"]["vision_cfg"].update(
        patch_size=d["clip"]["image_size"] + draw(st.integers(1, 8))),
    "clip.model_config.vision_cfg.head_width": lambda d, draw: d["clip"]["model_config"]["vision_cfg"].update(
        head_width=draw(st.sampled_from([0, 48, 64]))),
}


@pytest.mark.parametrize("field", sorted(INVALID))
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=valid_configs(), draw=st.data())
def test_invalid_config_is_refused_naming_the_field(field, data, draw):
    ClipCapConfig.from_dict(copy.deepcopy(data))  # the unmutated config is valid
    INVALID[field](data, draw.draw)
    with pytest.raises(BundleError) as error:
        ClipCapConfig.from_dict(json.loads(json.dumps(data)))
    assert "field '" in str(error.value) and field in str(error.value)
