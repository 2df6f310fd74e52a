"""Rows of different lengths in one KV cache, left-padded: what lets a new row join a running decode.

A cache of this discipline holds (B, H, L, D) tensors and `pads` (B,): row b's keys and values sit at
positions pads[b]..L-1, the first pads[b] are padding that no query attends to. A step appends at L
for every row; each row's position ids count only its own positions. The torch runtime, the
onnxruntime concat decoder and TensorRT use it (the in-place decoder pads on the right instead: its
attention op takes each row's length). `pads` is None while no row is padded: those steps run
exactly as an unpadded batch, with no attention mask.
"""
from __future__ import annotations

import torch


def step_inputs(pads: torch.Tensor | None, past: int, length: int, batch: int, device: torch.device,
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(attention mask (B, past + length) or None when no row is padded, position ids (B, length))."""
    positions = torch.arange(past, past + length, device=device).expand(batch, length)
    if pads is None:
        return None, positions
    mask = (torch.arange(past + length, device=device)[None] >= pads[:, None]).long()
    return mask, positions - pads[:, None]


def join(first: list[torch.Tensor], first_pads: torch.Tensor | None, second: list[torch.Tensor],
         second_pads: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The rows of `first` then those of `second`, each (B, H, L, D) list padded on the left to the longer length."""
    first_pads = _pads(first, first_pads)
    second_pads = _pads(second, second_pads)
    first_length, second_length = first[0].shape[2], second[0].shape[2]
    length = max(first_length, second_length)
    joined = [torch.cat((_left_pad(a, length), _left_pad(b, length))) for a, b in zip(first, second)]
    pads = torch.cat((first_pads + (length - first_length), second_pads + (length - second_length)))
    return trim(joined, pads)


def select(tensors: list[torch.Tensor], pads: torch.Tensor | None, index: torch.Tensor,
           ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Rows `index` (repeats, reorders, drops), then the columns no row uses any more dropped."""
    selected = [t.index_select(0, index) for t in tensors]
    return trim(selected, None if pads is None else pads.index_select(0, index.to(pads.device)))


def trim(tensors: list[torch.Tensor], pads: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Drop the leading columns that are padding in every row; pads None once no row is padded."""
    if pads is None or pads.numel() == 0:
        return tensors, None
    shared = int(pads.min())
    if shared:
        tensors = [t[:, :, shared:] for t in tensors]
        pads = pads - shared
    return tensors, (pads if bool(pads.any()) else None)


def _pads(tensors: list[torch.Tensor], pads: torch.Tensor | None) -> torch.Tensor:
    return pads if pads is not None else torch.zeros(tensors[0].shape[0], dtype=torch.long, device=tensors[0].device)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, missing, 0))
