"""Checkpoints of the paper's code import, infer their sizes, and decode like the paper; hub names
resolve from the local cache and fail at once, naming the flag, when the hub cannot be reached."""
import os
import subprocess
import sys

import pytest
import torch

from clipcap.formats.model_bundle import load_bundle, save_bundle
from clipcap.formats.original import import_original
from clipcap.config import BundleError
from clipcap.decoding import DecodingOptions, generate
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import TINY_CLIP
from reference import paper_greedy


def _original_checkpoint(bundle_dir, path):
    """The paper's key layout: clip_project.* + gpt.* with the legacy attention buffers, no CLIP."""
    model = load_bundle(bundle_dir).model
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    n_pos = model.config.gpt2.n_positions
    for layer in range(model.config.gpt2.n_layer):
        state[f"gpt.transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos))[None, None]
        state[f"gpt.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path)
    return model


@pytest.mark.parametrize("fixture", ["tiny_bundle", "tiny_transformer_bundle"])
def test_import_decodes_like_the_paper(request, tmp_path, tiny_tokenizer, fixture):
    source = _original_checkpoint(request.getfixturevalue(fixture), tmp_path / "weights.pt")
    clip_json = tmp_path / "tiny-clip.json"
    import json
    clip_json.write_text(json.dumps(TINY_CLIP))
    # The paper's GPT-2 tokenizer comes from the hub; here the test's own tokenizer.json stands in for it.
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    bundle = import_original(tmp_path / "weights.pt", clip_model=str(clip_json), clip_pretrained="none",
                             tokenizer=str(tmp_path / "tokenizer.json"),
                             normalize_prefix=source.config.normalize_prefix)
    mapper, expected = bundle.config.mapper, source.config.mapper
    assert (mapper.type, mapper.prefix_length) == (expected.type, expected.prefix_length)
    if mapper.type == "transformer":
        assert (mapper.clip_length, mapper.num_layers, mapper.mlp_ratio) == (3, 2, 2.0)
    assert bundle.config.gpt2 == source.config.gpt2
    saved = load_bundle(save_bundle(bundle.model, bundle.tokenizer, tmp_path / "bundle"))
    # The imported CLIP is random (no pretrained tag): feed the same CLIP embeddings to both.
    embeddings = torch.randn(6, 24)
    runtime = TorchRuntime(saved.model)
    prefix = runtime.map_embeddings(embeddings)
    stop = saved.config.tokenizer.stop_token_ids
    ours = generate(runtime, prefix, DecodingOptions(), stop, 24)
    with torch.no_grad():
        source_prefix = source.prefix(embeddings)
    assert ours == [paper_greedy(source, source_prefix[i], stop, 24) for i in range(6)]


def test_wrong_clip_is_refused(tmp_path, tiny_bundle):
    _original_checkpoint(tiny_bundle, tmp_path / "weights.pt")
    with pytest.raises(BundleError, match="expects CLIP embeddings of size 24, but ViT-B-32 produces 512"):
        import_original(tmp_path / "weights.pt", clip_model="ViT-B-32", clip_pretrained="none")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not a loadable PyTorch weights file"):
        import_original(tmp_path / "x.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(BundleError, match="not a ClipCap checkpoint"):
        import_original(tmp_path / "y.pt")


def _tiny_checkpoint(tmp_path, bundle_dir) -> str:
    _original_checkpoint(bundle_dir, tmp_path / "weights.pt")
    return str(tmp_path / "weights.pt")


@pytest.mark.parametrize("flag, kwargs", [
    ("--clip-pretrained", dict(clip_model="ViT-B-32", clip_pretrained="openai", tokenizer="gpt2")),
    ("--tokenizer", dict(clip_model="ViT-B-32", clip_pretrained="none", tokenizer="gpt2")),
])
def test_hub_name_without_network_is_refused_naming_the_flag(full_size_checkpoint, no_network, flag, kwargs):
    with pytest.raises(BundleError) as error:
        import_original(full_size_checkpoint, **kwargs)
    message = str(error.value)
    assert message.startswith(f"{flag}:") and "not in the local Hugging Face cache" in message
    hints = ["weights file", "'none'"] if flag == "--clip-pretrained" else ["tokenizer.json"]
    assert all(hint in message for hint in hints)
    assert 1 <= len(no_network) <= 2  # one short probe (httpx may resolve twice), no retry loop


@pytest.fixture
def full_size_checkpoint(tmp_path, tiny_tokenizer):
    """A paper-layout checkpoint whose mapper takes 512-wide embeddings (ViT-B-32's), with a tiny GPT-2."""
    from conftest import write_paper_checkpoint

    return write_paper_checkpoint(tmp_path / "vitb32.pt", tiny_tokenizer, embed_dim=512)


def test_cached_hub_files_load_without_network(tmp_path, full_size_checkpoint, tiny_tokenizer, no_network):
    """'gpt2' resolves from the local cache with the network gone; no request is made for it."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hf-cache" / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    tiny_tokenizer.save(snapshot / "tokenizer.json")
    assert huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / "hf-cache")
    bundle = import_original(full_size_checkpoint, clip_pretrained="none", tokenizer="gpt2")
    assert bundle.tokenizer.vocab_size == tiny_tokenizer.vocab_size and no_network == []


def test_cli_offline_defaults_exit_2_with_error_line(tmp_path, full_size_checkpoint):
    """The command with its default hub names, offline: exit 2 and one `error:` line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-m", "clipcap.cli", "import-original", full_size_checkpoint,
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: --clip-pretrained:") and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_tag_and_missing_tokenizer_file(tmp_path, full_size_checkpoint, no_network):
    with pytest.raises(BundleError, match="--clip-pretrained: 'nope' is neither a file nor an open_clip hub tag"):
        import_original(full_size_checkpoint, clip_pretrained="nope")
    with pytest.raises(BundleError, match="--tokenizer: .*missing/tokenizer.json: no such file"):
        import_original(full_size_checkpoint, clip_pretrained="none",
                        tokenizer=str(tmp_path / "missing/tokenizer.json"))
    assert no_network == []


def test_local_clip_weights_file_loads_into_the_tower(tmp_path, tiny_bundle, tiny_tokenizer, no_network):
    import json
    import open_clip
    from safetensors.torch import save_file

    checkpoint = _tiny_checkpoint(tmp_path, tiny_bundle)
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    torch.manual_seed(1)
    full = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "clip.safetensors")
    bundle = import_original(checkpoint, clip_model=str(tmp_path / "clip.json"),
                             clip_pretrained=str(tmp_path / "clip.safetensors"),
                             tokenizer=str(tmp_path / "tokenizer.json"))
    tower = bundle.model.clip.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in full.visual.state_dict().items())
    assert bundle.config.clip.pretrained == "clip.safetensors" and no_network == []
