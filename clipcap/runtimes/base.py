"""The `Runtime` protocol: the only thing a backend implements.

Tensors crossing this seam are torch tensors on `runtime.device` (onnxruntime wraps numpy
zero-copy; TensorRT uses torch CUDA tensors as its device buffers). The cache is opaque to the
caller: decoding only creates it, passes it back, and selects batch rows from it.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from clipcap.config import ClipCapConfig


class RuntimeUnavailable(RuntimeError):
    """The backend cannot run here (package or device missing); the message says what to install."""


class Runtime(Protocol):
    config: ClipCapConfig
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, P, E) prefix embeddings."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, prefix_size) CLIP image embeddings, before the mapper
        (an export bundle's encoder graph outputs them beside the prefix)."""

    def map_embeddings(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, prefix_size) CLIP embeddings -> (B, P, E) prefix embeddings."""

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, E) GPT-2 input embeddings."""

    def new_cache(self, batch_size: int) -> Any:
        """An empty KV cache for `batch_size` rows."""

    def step(self, embeds: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Run (B, T, E) new embeddings after the cached ones -> ((B, V) last-position logits, cache)."""

    def select(self, cache: Any, index: torch.Tensor) -> Any:
        """Keep/reorder batch rows: cache row i becomes old row index[i] (beam reorder, finished rows)."""
