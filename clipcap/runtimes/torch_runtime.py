"""The PyTorch reference runtime: `ClipCapModel` in eager mode, KV cache as transformers' DynamicCache."""
from __future__ import annotations

from pathlib import Path

import torch

from clipcap.config import ClipCapConfig
from clipcap.formats.model_bundle import load_config, load_model
from clipcap.runtimes.base import RuntimeUnavailable


class TorchRuntime:
    def __init__(self, model, device: str = "cpu"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("device 'cuda' asked for, but torch sees no CUDA GPU on this machine")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config: ClipCapConfig = model.config

    @classmethod
    def from_path(cls, path: Path, device: str = "cpu", config: ClipCapConfig | None = None) -> "TorchRuntime":
        return cls(load_model(path, config or load_config(path)), device)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode(pixels.to(self.device))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device))

    @torch.inference_mode()
    def map_embeddings(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(clip_embeddings.to(self.device))

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids.to(self.device))

    def new_cache(self, batch_size: int):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        batch, length, _ = embeds.shape
        past = cache.get_seq_length()
        positions = torch.arange(past, past + length, device=self.device).expand(batch, length)
        # `cache=`: the keyword transformers keeps (`past_key_values` is deprecated, removed in 5.40).
        out = self.model.gpt(inputs_embeds=embeds, cache=cache, position_ids=positions,
                             use_cache=True, logits_to_keep=1)  # only the last position's logits are used
        return out.logits[:, -1].float(), out.cache

    def select(self, cache, index: torch.Tensor):
        cache.reorder_cache(index.to(self.device))
        return cache


class TorchBf16Runtime(TorchRuntime):
    """`TorchRuntime` with the CLIP image tower in bfloat16, weights and arithmetic: oneDNN's AVX-512
    BF16 / AMX kernels on CPUs that have them (export/README, "Encoder options": measured), kernels
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
        return self.model.clip(pixels.to(self.device, torch.bfloat16)).float()
