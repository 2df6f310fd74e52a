"""Rows of different lengths in one KV cache, left-padded: what lets a new row join a running decode.

A cache of this discipline holds (B, H, L, D) tensors and `pads` (B,): row b's keys and values sit at
positions pads[b]..L-1, the first pads[b] are padding that no query attends to. A step appends at L
for every row; each row's position ids count only its own positions. The torch runtime, the
onnxruntime concat decoder and TensorRT use it (the in-place decoder pads on the right instead: its
attention op takes each row's length). `pads` is None while no row is padded: those steps run
exactly as an unpadded batch, with no attention mask. Written once against the array API: numpy
(onnxruntime on CPU) and torch (torch, TensorRT, onnxruntime on CUDA) alike.
"""
from __future__ import annotations

from typing import Any

import clipcap.arrays as arrays


def step_inputs(pads: Any | None, past: int, length: int, batch: int, xp: Any, device: Any,
                ) -> tuple[Any | None, Any]:
    """(attention mask (B, past + length) int64 or None when no row is padded, position ids (B, length) int64),
    arrays of namespace `xp` on `device`."""
    positions = xp.broadcast_to(xp.arange(past, past + length, dtype=xp.int64, device=device)[None], (batch, length))
    if pads is None:
        return None, positions
    mask = xp.astype(xp.arange(past + length, dtype=xp.int64, device=device)[None] >= pads[:, None], xp.int64)
    return mask, positions - pads[:, None]


def join(first: list[Any], first_pads: Any | None, second: list[Any], second_pads: Any | None,
         ) -> tuple[list[Any], Any | None]:
    """The rows of `first` then those of `second`, each (B, H, L, D) list padded on the left to the longer length."""
    xp = arrays.namespace(first[0])
    first_pads = _pads(first, first_pads)
    second_pads = _pads(second, second_pads)
    first_length, second_length = first[0].shape[2], second[0].shape[2]
    length = max(first_length, second_length)
    joined = [xp.concat((arrays.pad_left(a, 2, length), arrays.pad_left(b, 2, length))) for a, b in zip(first, second)]
    pads = xp.concat((first_pads + (length - first_length), second_pads + (length - second_length)))
    return trim(joined, pads)


def select(tensors: list[Any], pads: Any | None, index: Any) -> tuple[list[Any], Any | None]:
    """Rows `index` (repeats, reorders, drops), then the columns no row uses any more dropped."""
    xp = arrays.namespace(tensors[0])
    selected = [xp.take(t, index, axis=0) for t in tensors]
    return trim(selected, None if pads is None else xp.take(pads, index, axis=0))


def trim(tensors: list[Any], pads: Any | None) -> tuple[list[Any], Any | None]:
    """Drop the leading columns that are padding in every row; pads None once no row is padded."""
    if pads is None or pads.shape[0] == 0:
        return tensors, None
    xp = arrays.namespace(pads)
    shared = int(xp.min(pads))
    if shared:
        tensors = [t[:, :, shared:] for t in tensors]
        pads = pads - shared
    return tensors, (pads if bool(xp.any(pads != 0)) else None)


def _pads(tensors: list[Any], pads: Any | None) -> Any:
    xp = arrays.namespace(tensors[0])
    return pads if pads is not None else xp.zeros(tensors[0].shape[0], dtype=xp.int64, device=arrays.device(tensors[0]))
