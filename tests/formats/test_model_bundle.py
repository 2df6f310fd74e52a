"""Model bundles: round trip, and clear errors for every way a bundle can be broken."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from clipcap.config import BundleError
from clipcap.formats.model_bundle import load_bundle, save_bundle
from conftest import random_images


def test_round_trip_gives_identical_outputs(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    copy = load_bundle(save_bundle(bundle.model, bundle.tokenizer, tmp_path / "copy"))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model.encode(pixels), copy.model.encode(pixels))
    # GPT-2's tied lm_head comes back tied, not as a separate random matrix.
    assert copy.model.gpt.lm_head.weight.data_ptr() == copy.model.gpt.transformer.wte.weight.data_ptr()


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "broken")


def test_missing_weights(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: file not found"):
        load_bundle(broken)


def test_corrupt_weights(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BundleError, match="not a readable safetensors"):
        load_bundle(broken)


def test_wrong_shapes_are_named(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    config = json.loads((broken / "clipcap.json").read_text())
    config["mapper"]["prefix_length"] = 6  # the weights were saved for 4
    (broken / "clipcap.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"4 tensor\(s\) of the wrong shape, e.g. clip_project\.model\.0\.bias: file \(128,\) vs model \(192,\)"):
        load_bundle(broken)


def test_a_transposed_weight_is_a_wrong_shape(tiny_bundle, tmp_path):
    """Same number of elements, other shape: refused by shape, never loaded as if it fitted."""
    from safetensors.torch import load_file

    broken = _copy(tiny_bundle, tmp_path)
    state = load_file(broken / "model.safetensors")
    name = next(k for k, v in sorted(state.items()) if v.ndim == 2 and v.shape[0] != v.shape[1])
    state[name] = state[name].t().contiguous()
    save_file(state, broken / "model.safetensors")
    with pytest.raises(BundleError, match=rf"1 tensor\(s\) of the wrong shape, e.g. {name}"):
        load_bundle(broken)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    config = json.loads((broken / "clipcap.json").read_text())
    vocab = load_bundle(tiny_bundle).tokenizer.vocab_size
    config["gpt2"]["vocab_size"] = vocab - 1
    (broken / "clipcap.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=f"{vocab} tokens, more than gpt2.vocab_size={vocab - 1}"):
        load_bundle(broken)


def test_unexpected_tensor(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    from safetensors.torch import load_file
    state = load_file(broken / "model.safetensors")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(BundleError, match="unexpected, e.g. extra.weight"):
        load_bundle(broken)


def test_missing_tokenizer_and_bad_config(tiny_bundle, tmp_path):
    broken = _copy(tiny_bundle, tmp_path)
    (broken / "tokenizer.json").write_text("nonsense")
    with pytest.raises(BundleError, match="tokenizer.json: not a valid tokenizers JSON"):
        load_bundle(broken)
    (broken / "clipcap.json").write_text("[]")
    with pytest.raises(BundleError, match="clipcap.json: field 'top level' must be a JSON object"):
        load_bundle(broken)
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nowhere")


def test_transformer_bundle_loads(tiny_transformer_bundle):
    bundle = load_bundle(tiny_transformer_bundle)
    assert bundle.config.mapper.type == "transformer" and bundle.config.normalize_prefix
    assert len(random_images(1)) == 1
