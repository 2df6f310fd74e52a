"""clipcap.json schema: round trip and clear errors naming the file and field."""
import json

import pytest

from clipcap.config import BundleError, ClipCapConfig


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
