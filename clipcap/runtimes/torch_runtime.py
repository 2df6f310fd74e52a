"""The PyTorch reference runtime: `ClipCapModel` in eager mode, KV cache as transformers' DynamicCache.

Rows of different lengths (a row joining a running decode) are left-padded (clipcap.runtimes.padding):
GPT-2 then gets an attention mask and each row's own position ids; an unpadded batch runs without a mask.
Inputs may be numpy arrays (preprocessed pixels, CLIP embeddings); outputs are torch tensors on `device`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import array_api_compat.torch as xp
import torch

from clipcap.config import ClipCapConfig
from clipcap.formats.model_bundle import load_config, load_model
from clipcap.runtimes import padding
from clipcap.runtimes.base import RuntimeUnavailable, compute_threads


@dataclass
class TorchCache:
    """transformers' DynamicCache and the left padding of each row (None: no row padded)."""

    layers: object  # transformers.DynamicCache
    pads: torch.Tensor | None = None  # (B,) padding positions before each row's first

    @property
    def length(self) -> int:
        """Positions held (the longest row's, padding included)."""
        return self.layers.get_seq_length()

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.layers for t in (layer.keys, layer.values)]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], pads: torch.Tensor | None) -> "TorchCache":
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(len(tensors) // 2):
            cache.update(tensors[2 * layer], tensors[2 * layer + 1], layer)
        return cls(cache, pads)


class TorchRuntime:
    def __init__(self, model, device: str = "cpu"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("device 'cuda' asked for, but torch sees no CUDA GPU on this machine")
        if compute_threads() is not None:
            torch.set_num_threads(compute_threads())
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config: ClipCapConfig = model.config

    @classmethod
    def from_path(cls, path: Path, device: str = "cpu", config: ClipCapConfig | None = None) -> "TorchRuntime":
        return cls(load_model(path, config or load_config(path)), device)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode(torch.as_tensor(pixels).to(self.device))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(torch.as_tensor(pixels).to(self.device))

    @torch.inference_mode()
    def map_embeddings(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(torch.as_tensor(clip_embeddings).to(self.device))

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(torch.as_tensor(token_ids).to(self.device))

    def new_cache(self, batch_size: int) -> TorchCache:
        from transformers import DynamicCache

        return TorchCache(DynamicCache())

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache: TorchCache) -> tuple[torch.Tensor, TorchCache]:
        batch, length, _ = embeds.shape
        mask, positions = padding.step_inputs(cache.pads, cache.length, length, batch, xp, self.device)
        # `cache=`: the keyword transformers keeps (`past_key_values` is deprecated, removed in 5.40).
        out = self.model.gpt(inputs_embeds=embeds, cache=cache.layers, position_ids=positions, attention_mask=mask,
                             use_cache=True, logits_to_keep=1)  # only the last position's logits are used
        return out.logits[:, -1].float(), TorchCache(out.cache, cache.pads)

    @torch.inference_mode()
    def select(self, cache: TorchCache, index: torch.Tensor) -> TorchCache:
        index = index.to(self.device)
        if cache.pads is None:
            cache.layers.reorder_cache(index)
            return cache
        return TorchCache.from_tensors(*padding.select(cache.tensors(), cache.pads, index))

    @torch.inference_mode()
    def join(self, first: TorchCache, second: TorchCache) -> TorchCache:
        return TorchCache.from_tensors(*padding.join(first.tensors(), first.pads, second.tensors(), second.pads))


class TorchBf16Runtime(TorchRuntime):
    """`TorchRuntime` with the CLIP image tower in bfloat16, weights and arithmetic: oneDNN's AVX-512
    BF16 / AMX kernels on CPUs that have them (docs/decisions/bf16-as-torch-backend.md: measured), kernels
    without bf16 arithmetic on CPUs that do not (the same numbers). The mapper and GPT-2 stay float32,
    and the CLIP embedding leaves the tower as float32."""

    def __init__(self, model, device: str = "cpu"):
        super().__init__(model, device)
        self.model.clip.to(torch.bfloat16)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(self.encode_image(pixels))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.clip(torch.as_tensor(pixels).to(self.device, torch.bfloat16)).float()
