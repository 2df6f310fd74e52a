"""The few array helpers the array API standard lacks, for numpy (onnxruntime) and torch (torch, TensorRT) alike.

Decoding, padding and the onnxruntime caches are written once against `namespace(x)` (array-api-compat's
`array_namespace`); what the standard does not name (softmax, top-k, a buffer's address) is here.
Nothing here imports torch: a torch array brings its own namespace.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace as namespace
from array_api_compat import device, is_numpy_array, is_numpy_namespace

__all__ = ["as_buffer", "data_ptr", "device", "dtype_name", "isin", "log_softmax", "namespace", "pad_left", "softmax", "to_numpy",
           "topk"]


def log_softmax(x: Any) -> Any:
    """log softmax over the last axis."""
    xp = namespace(x)
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(x: Any) -> Any:
    """softmax over the last axis."""
    xp = namespace(x)
    exp = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return exp / xp.sum(exp, axis=-1, keepdims=True)


def topk(x: Any, k: int) -> tuple[Any, Any]:
    """The k largest values of a 1-d array and their indices, largest first (torch's own on torch: the same ties)."""
    if not is_numpy_array(x):
        return x.topk(k)
    index = np.argpartition(-x, k - 1)[:k] if k < x.shape[0] else np.arange(x.shape[0])
    index = index[np.argsort(-x[index], kind="stable")]
    return x[index], index


def isin(x: Any, values: Any) -> Any:
    """Whether each element of 1-d `x` is one of 1-d `values` (which may be empty)."""
    xp = namespace(x)
    return xp.any(x[:, None] == values[None, :], axis=-1)


def pad_left(x: Any, axis: int, length: int) -> Any:
    """`x` with zeros before its entries along `axis` up to `length`."""
    missing = length - x.shape[axis]
    if missing == 0:
        return x
    xp = namespace(x)
    shape = list(x.shape)
    shape[axis] = missing
    return xp.concat((xp.zeros(tuple(shape), dtype=x.dtype, device=device(x)), x), axis=axis)


def dtype_name(x: Any) -> str:
    """The element type's name, the same in numpy and torch: float32, float16, int64."""
    return str(x.dtype).removeprefix("torch.")


def as_buffer(x: Any, xp: Any, dtype: str, device: Any) -> Any:
    """`x` (a numpy array or a torch tensor) as a C-contiguous `dtype` array of namespace `xp` on `device`,
    copied only when it is not one already."""
    if is_numpy_namespace(xp):
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)
    import torch  # xp is torch's namespace: torch is loaded

    return torch.as_tensor(x).to(device, getattr(torch, dtype)).contiguous()


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy copy (or the array itself) of a numpy array or a torch tensor on any device."""
    if is_numpy_array(x):
        return x
    return x.detach().cpu().numpy()


def data_ptr(x: Any) -> int:
    """The address of a C-contiguous array's first element (what onnxruntime's IOBinding takes)."""
    if is_numpy_array(x):
        if not x.flags.c_contiguous:
            raise ValueError("data_ptr: the array is not C-contiguous")
        return x.ctypes.data
    if not x.is_contiguous():
        raise ValueError("data_ptr: the tensor is not contiguous")
    return x.data_ptr()
