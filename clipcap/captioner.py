"""`Captioner`: images -> preprocess -> runtime -> decoding -> text. What the CLI, handler and benchmarks call."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

import clipcap.arrays as arrays
from clipcap.config import BundleError, ClipCapConfig
from clipcap.decoding import DecodingOptions, generate
from clipcap.formats.model_bundle import load_config, load_tokenizer
from clipcap.images import DEFAULT_FORMATS, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_pixels, load_pixels_file, preprocess
from clipcap.runtimes import Runtime, open_runtime
from clipcap.tokenizer import CaptionTokenizer


@dataclass
class Caption:
    caption: str  # decoded text, stripped
    token_ids: list[int]  # generated ids, the stop token included when one was produced


@dataclass
class CaptionBatch:
    captions: list[Caption]
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess / encode / decode, whole batch


class Captioner:
    def __init__(self, runtime: Runtime, tokenizer: CaptionTokenizer, config: ClipCapConfig):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_path(cls, path: str | Path, backend: str | None = None, device: str = "cpu") -> "Captioner":
        """Open any bundle (model, export, int8 sibling, TensorRT); `backend` overrides the one its kind
        needs (clipcap.formats.detect). Each file is read once."""
        config = load_config(path)
        return cls(open_runtime(path, backend, device, config), load_tokenizer(path, config), config)

    @property
    def token_limit(self) -> int:
        """The most tokens positions allow after the prefix."""
        return self.config.token_limit

    def default_options(self) -> DecodingOptions:
        return DecodingOptions(max_tokens=self.config.max_tokens)

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        clip = self.config.clip
        return preprocess(images, clip.image_size, clip.mean, clip.std)

    def load_pixels(self, data: bytes, formats: Iterable[str] = DEFAULT_FORMATS,
                    max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """Image bytes -> (3, S, S) pixels by clipcap.images.load_pixels (a JPEG decoded at the scale this
        bundle's input needs), or ImageError. Stack rows for `caption_pixels`."""
        clip = self.config.clip
        return load_pixels(data, clip.image_size, clip.mean, clip.std, formats, max_pixels, max_bytes)

    def load_pixels_file(self, path: str | Path, formats: Iterable[str] = DEFAULT_FORMATS,
                         max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """`load_pixels` of a file; the ImageError names it."""
        clip = self.config.clip
        return load_pixels_file(path, clip.image_size, clip.mean, clip.std, formats, max_pixels, max_bytes)

    def caption_images(self, images: list[Image.Image], options: DecodingOptions | None = None,
                       seeds: Sequence[int] | None = None) -> CaptionBatch:
        """`seeds`: nucleus, one per image (see `generate`); None: image i samples with options.seed + i."""
        start = time.perf_counter()
        pixels = self.preprocess(images)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        batch = self.caption_pixels(pixels, options, seeds)
        batch.timings_ms = {"preprocess": preprocess_ms, **batch.timings_ms}
        return batch

    def caption_pixels(self, pixels: Any, options: DecodingOptions | None = None,
                       seeds: Sequence[int] | None = None) -> CaptionBatch:
        start = time.perf_counter()
        prefix = self.runtime.encode(pixels)
        encode_ms = (time.perf_counter() - start) * 1e3
        batch = self._decode(prefix, options, seeds)
        batch.timings_ms = {"encode": encode_ms, **batch.timings_ms}
        return batch

    def caption_embeddings(self, embeddings: Any,
                           options: DecodingOptions | None = None, seeds: Sequence[int] | None = None) -> CaptionBatch:
        """Captions for precomputed CLIP embeddings, shape (N, prefix_size)."""
        embeddings = np.asarray(arrays.to_numpy(embeddings), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.clip.embed_dim:
            raise BundleError(f"embeddings must have shape (N, {self.config.clip.embed_dim}) for this bundle, "
                              f"got {tuple(embeddings.shape)}")
        return self._decode(self.runtime.map_embeddings(embeddings), options, seeds)

    def _decode(self, prefix: Any, options: DecodingOptions | None,
                seeds: Sequence[int] | None = None) -> CaptionBatch:
        options = (options or self.default_options()).validate(self.token_limit)
        max_tokens = options.max_tokens or self.config.max_tokens
        start = time.perf_counter()
        token_lists = generate(self.runtime, prefix, options, self.config.tokenizer.stop_token_ids, max_tokens, seeds)
        decode_ms = (time.perf_counter() - start) * 1e3
        captions = [Caption(self.tokenizer.decode(ids), ids) for ids in token_lists]
        return CaptionBatch(captions, {"decode": decode_ms})
