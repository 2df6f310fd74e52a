"""Checkpoints of the paper's code import, infer their sizes, and decode like the paper."""
import pytest
import torch

from clipcap.formats.model_bundle import load_bundle, save_bundle
from clipcap.formats.original import import_original
from clipcap.config import BundleError
from clipcap.images import preprocess
from clipcap.decoding import DecodingOptions, generate
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import TINY_CLIP, random_images
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
def test_import_decodes_like_the_paper(request, tmp_path, tiny_tokenizer, monkeypatch, fixture):
    source = _original_checkpoint(request.getfixturevalue(fixture), tmp_path / "weights.pt")
    clip_json = tmp_path / "tiny-clip.json"
    import json
    clip_json.write_text(json.dumps(TINY_CLIP))
    # The paper's GPT-2 tokenizer comes from the hub; here the test's own tokenizer stands in for it.
    monkeypatch.setattr("clipcap.formats.original.CaptionTokenizer.from_pretrained", lambda name: tiny_tokenizer)
    bundle = import_original(tmp_path / "weights.pt", clip_model=str(clip_json), clip_pretrained="none",
                             tokenizer="gpt2", normalize_prefix=source.config.normalize_prefix)
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
