"""Full-size architecture (ViT-B-32 + GPT-2 small, random weights): builds, encodes, decodes."""
import pytest
import torch

from clipcap.config import ClipCapConfig
from clipcap.decoding import DecodingOptions, generate
from clipcap.model import ClipCapModel, resolve_clip_config
from clipcap.runtimes.torch_runtime import TorchRuntime


@pytest.mark.slow
def test_vit_b32_gpt2_small_decodes():
    torch.manual_seed(0)
    config = ClipCapConfig(clip=resolve_clip_config("ViT-B-32")).validate()
    model = ClipCapModel(config)
    assert config.clip.embed_dim == 512 and config.clip.image_size == 224
    assert sum(p.numel() for p in model.gpt.parameters()) == 124_439_808  # GPT-2 small
    runtime = TorchRuntime(model)
    prefix = runtime.encode(torch.randn(2, 3, 224, 224))
    assert prefix.shape == (2, 10, 768)
    out = generate(runtime, prefix, DecodingOptions(), config.tokenizer.stop_token_ids, 3)
    assert all(1 <= len(ids) <= 3 for ids in out)
    assert out == generate(runtime, prefix, DecodingOptions(use_cache=False), config.tokenizer.stop_token_ids, 3)
