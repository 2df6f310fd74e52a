"""Mapping networks keep the paper's shapes and parameter names."""
import torch

from clipcap.config import MapperConfig
from clipcap.mappers import MLPMapper, TransformerMapper


def test_mlp_names_and_shapes():
    mapper = MLPMapper(512, 768, MapperConfig(type="mlp", prefix_length=10))
    shapes = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    assert shapes == {"model.0.weight": (3840, 512), "model.0.bias": (3840,),
                      "model.2.weight": (7680, 3840), "model.2.bias": (7680,)}
    assert mapper(torch.randn(3, 512)).shape == (3, 10, 768)


def test_transformer_names_and_shapes():
    config = MapperConfig(type="transformer", prefix_length=40, clip_length=40, num_layers=2)
    mapper = TransformerMapper(640, 64, config)
    keys = set(mapper.state_dict())
    layer = "transformer.layers.1."
    for name in ("norm1.weight", "attn.to_queries.weight", "attn.to_keys_values.weight", "attn.project.weight",
                 "attn.project.bias", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.bias"):
        assert layer + name in keys
    assert "transformer.layers.0.attn.to_queries.bias" not in keys  # the paper's q/kv have no bias
    assert mapper.state_dict()["transformer.layers.0.mlp.fc1.weight"].shape == (128, 64)  # ratio 2.0
    assert mapper.prefix_const.shape == (40, 64) and mapper.linear.weight.shape == (40 * 64, 640)
    assert mapper(torch.randn(2, 640)).shape == (2, 40, 64)


def test_transformer_output_depends_on_the_image():
    torch.manual_seed(0)
    mapper = TransformerMapper(16, 32, MapperConfig(type="transformer", prefix_length=4, clip_length=3, num_layers=1))
    out = mapper(torch.randn(2, 16))
    assert not torch.allclose(out[0], out[1])
