"""Every hub name a script accepts resolves through clipcap.hub: from the local cache without a request,
and offline with one short probe and the same `error: --flag: ...` line and exit code 2 as import-original."""
from __future__ import annotations

import json

import pytest
import torch

from clipcap.config import BundleError
from clipcap.hub import gpt2_folder
from clipcap.model import gpt2_config_from_folder
from clipcap.tokenizer import train_bpe
from conftest import write_gpt2_folder
from training import extract_features as extract_script, train as train_script


def test_train_gpt2_hub_name_offline_is_one_error_line(tmp_path, no_network, capsys):
    code = train_script.main(["--features", str(tmp_path / "features"), "--gpt2", "gpt2", "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: --gpt2: gpt2/config.json is not in the local Hugging Face cache") and "\n" == error[-1]
    assert "pass --gpt2 with a local folder" in error and "Traceback" not in error
    assert 1 <= len(no_network) <= 2  # one short probe (httpx may resolve twice), no retry loop
    assert not (tmp_path / "run").exists()  # refused before any work


def test_extract_clip_pretrained_tag_offline_is_one_error_line(tmp_path, no_network, capsys):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red circle."}) + "\n")
    code = extract_script.main(["--data", str(tmp_path / "pairs.jsonl"), "--clip-model", "ViT-B-32",
                                "--clip-pretrained", "openai", "--out", str(tmp_path / "features")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: --clip-pretrained: ") and "not in the local Hugging Face cache" in error
    assert "'none'" in error and "Traceback" not in error
    assert 1 <= len(no_network) <= 2


def test_unknown_clip_tag_and_missing_gpt2_folder_are_refused_without_a_request(tmp_path, no_network, capsys):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red circle."}) + "\n")
    assert extract_script.main(["--data", str(tmp_path / "pairs.jsonl"), "--clip-model", "ViT-B-32",
                                "--clip-pretrained", "nope", "--out", str(tmp_path / "f")]) == 2
    assert "error: --clip-pretrained: 'nope' is neither a file nor an open_clip hub tag" in capsys.readouterr().err
    assert train_script.main(["--features", str(tmp_path), "--gpt2", str(tmp_path / "no-such-gpt2"),
                              "--out", str(tmp_path / "run")]) == 2
    assert "error: --gpt2: " in capsys.readouterr().err
    assert no_network == []


def test_cached_gpt2_resolves_to_its_snapshot_folder_without_a_request(tmp_path, tiny_tokenizer, no_network):
    from transformers import GPT2Config, GPT2LMHeadModel

    snapshot = tmp_path / "hf-cache" / "models--gpt2" / "snapshots" / ("0" * 40)
    (snapshot.parent.parent / "refs").mkdir(parents=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=tiny_tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=1,
                               n_head=1)).save_pretrained(snapshot)
    tiny_tokenizer.save(snapshot / "tokenizer.json")
    assert gpt2_folder("gpt2") == str(snapshot) and no_network == []
    assert gpt2_folder(str(snapshot)) == str(snapshot)




def test_a_gpt2_folder_of_another_family_or_vocabulary_is_refused(tmp_path, tiny_tokenizer):
    from transformers import BertConfig

    from clipcap.training.trainer import TrainConfig, build_model_config

    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(BundleError, match="model_type 'bert'; ClipCap needs a GPT-2-family model"):
        gpt2_config_from_folder(str(tmp_path / "bert"))
    small = write_gpt2_folder(tmp_path / "gpt2", train_bpe(["a b c."], vocab_size=260))  # fewer tokens than tiny's
    config = TrainConfig(features=tmp_path, out=tmp_path / "run", gpt2=str(small))
    with pytest.raises(BundleError, match="its embedding has 2.. tokens, the tokenizer 300"):
        build_model_config(config, None, tiny_tokenizer, str(small))  # refused before the features are read
