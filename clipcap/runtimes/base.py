"""The `Runtime` protocol: the only thing a backend implements.

Arrays crossing this seam are the runtime's own on `runtime.device`: numpy for onnxruntime on the CPU,
torch tensors for torch, TensorRT and onnxruntime on CUDA; inputs from the host (pixels, CLIP
embeddings) may be numpy for every runtime. Decoding works on whichever comes back (the array API). The cache is opaque to the
caller: decoding only creates it, passes it back, and selects batch rows from it.

The cache contract, one rule for every backend (tests/runtimes/test_cache_contract.py checks it
against each; tests/test_decoding_loops.py checks that decoding keeps its side):
- `new_cache` returns a cache that shares no memory with any other: two decodes may share one
  runtime, interleaving their calls, each with its own cache.
- A cache given to `step` or `select` is spent. The backend may write into it (onnxruntime's
  in-place buffers, torch's DynamicCache), reorder it in place (torch's `select`) or reuse its
  memory for the cache it returns (TensorRT's double buffers); the caller uses only the returned
  cache from then on and never reads, steps or selects a spent one.
- What `step` returns as logits belongs to the caller: no later call overwrites it. `embeds` and
  `index` are only read.
- Calls on one runtime are made one at a time (not from two threads at once).

Rows of one cache may hold different lengths: `join` puts the rows of two caches in one (a request
joining a running decode), and every `step` gives each row its own positions. How a backend pads
the shorter rows is its own (left padding with an attention mask: clipcap.runtimes.padding; the
in-place onnxruntime decoder pads on the right); a row's logits do not depend on its batch mates
beyond fp32 rounding.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: the command line names backends without importing torch
    from clipcap.config import ClipCapConfig


_compute_threads: list[int | None] = [None]  # this process's compute threads: set_compute_threads


def set_compute_threads(threads: int) -> None:
    """This process's compute threads: onnxruntime sessions opened after this take them, and torch's
    (set now if torch is loaded, else by the torch runtime when it opens)."""
    _compute_threads[0] = threads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def compute_threads() -> int | None:
    """What set_compute_threads set (None: each library's default)."""
    return _compute_threads[0]


class RuntimeUnavailable(RuntimeError):
    """The backend cannot run here (package or device missing); the message says what to install."""


class Runtime(Protocol):
    config: ClipCapConfig
    device: Any  # where its arrays live: "cpu" for numpy, a torch.device for torch tensors

    def encode(self, pixels: Any) -> Any:
        """(B, 3, H, W) normalised pixels -> (B, P, E) prefix embeddings."""

    def encode_image(self, pixels: Any) -> Any:
        """(B, 3, H, W) normalised pixels -> (B, prefix_size) CLIP image embeddings, before the mapper
        (an export bundle's encoder graph outputs them beside the prefix)."""

    def map_embeddings(self, clip_embeddings: Any) -> Any:
        """(B, prefix_size) CLIP embeddings -> (B, P, E) prefix embeddings."""

    def embed(self, token_ids: Any) -> Any:
        """(B, T) token ids -> (B, T, E) GPT-2 input embeddings."""

    def new_cache(self, batch_size: int) -> Any:
        """An empty KV cache for `batch_size` rows, the caller's own (see the contract above)."""

    def step(self, embeds: Any, cache: Any) -> tuple[Any, Any]:
        """Run (B, T, E) new embeddings after the cached ones -> ((B, V) last-position logits, cache).

        Decoding asks for T > 1 only on an empty cache (the prefix, the no-cache baseline); `cache` is spent.
        """

    def select(self, cache: Any, index: Any) -> Any:
        """Keep/reorder batch rows: cache row i becomes old row index[i] (beam reorder, finished rows).

        `index` may repeat, reorder and drop rows; `cache` is spent.
        """

    def join(self, first: Any, second: Any) -> Any:
        """One cache holding the rows of `first`, then those of `second`, whatever their lengths; both are spent."""
