"""Mapping networks: one CLIP image embedding -> `prefix_length` GPT-2 input embeddings.

Both follow the paper's code (rmokady/CLIP_prefix_caption) in semantics *and* parameter names,
so the released checkpoints load with `load_state_dict` and no renaming table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcap.config import MAPPER_CLASSES, MapperConfig


class MLPMapper(nn.Module):
    """Linear -> Tanh -> Linear, hidden width E*P/2 (the paper's `MLP`, used with GPT-2 fine-tuned)."""

    def __init__(self, prefix_size: int, embed_dim: int, config: MapperConfig):
        super().__init__()
        self.prefix_length = config.prefix_length
        hidden = embed_dim * config.prefix_length // 2
        # Parameter names model.0 / model.2 are the original checkpoint's.
        self.model = nn.Sequential(
            nn.Linear(prefix_size, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim * config.prefix_length)
        )

    def forward(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        out = self.model(clip_embedding)  # (B, P*E)
        return out.view(clip_embedding.shape[0], self.prefix_length, -1)  # (B, P, E)


class MapperAttention(nn.Module):
    """Multi-head self-attention with the paper's names: to_queries, to_keys_values (no bias), project."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        queries = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (B, h, n, d)
        # The original packs keys and values as (…, 2, h, d) along the last axis: keep that layout.
        keys_values = self.to_keys_values(x).view(b, n, 2, h, c // h)
        keys = keys_values[:, :, 0].transpose(1, 2)
        values = keys_values[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values)  # softmax(q k^T / sqrt(d)) v
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class MapperMLP(nn.Module):
    """fc1 -> ReLU -> fc2, as the paper's `MlpTransformer`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MapperLayer(nn.Module):
    """Pre-LayerNorm transformer layer (the paper's `TransformerLayer`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MapperAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MapperMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MapperTransformer(nn.Module):
    """A stack of `MapperLayer`s under `.layers` (the paper's `Transformer`)."""

    def __init__(self, dim: int, config: MapperConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            MapperLayer(dim, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """CLIP embedding -> `clip_length` tokens, + learned prefix constants, through a transformer.

    The output keeps the last `prefix_length` positions (the constants, now conditioned on the
    image). No positional embedding, as in the paper. Used with GPT-2 frozen.
    """

    def __init__(self, prefix_size: int, embed_dim: int, config: MapperConfig):
        super().__init__()
        self.clip_length = config.clip_length
        self.linear = nn.Linear(prefix_size, config.clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, embed_dim))
        self.transformer = MapperTransformer(embed_dim, config)

    def forward(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        b = clip_embedding.shape[0]
        x = self.linear(clip_embedding).view(b, self.clip_length, -1)  # (B, clip_length, E)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1)  # (B, P, E)
        out = self.transformer(torch.cat((x, const), dim=1))
        return out[:, self.clip_length:]  # (B, P, E)


# mapper.type -> its class, by clipcap.config.MAPPER_CLASSES (training/train.py offers its keys).
MAPPERS: dict[str, type[nn.Module]] = {name: globals()[cls] for name, cls in MAPPER_CLASSES.items()}


def build_mapper(prefix_size: int, embed_dim: int, config: MapperConfig) -> nn.Module:
    return MAPPERS[config.type](prefix_size, embed_dim, config)
