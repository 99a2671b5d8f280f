"""Zero-copy torch views over memory that Julia owns (no Julia needed to test).

Julia hands the bridge raw addresses and element counts of its arrays. Julia's GC does not move
objects, and the solvers reuse a handful of buffers, so a view made once per (address, length) is
reused for the rest of the solve: after the first steps no view is created at all.

Layout: Julia arrays are column-major. A torch batch (B, n) in C order has the same memory as an
n × B Julia matrix, so a Julia buffer of n*B elements is viewed as (B, *state_shape) directly.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

_CTYPES = {torch.float64: ctypes.c_double, torch.float32: ctypes.c_float}


def view_at(address: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-d CPU tensor of `length` elements over the memory at `address` (no copy)."""
    if dtype not in _CTYPES:
        raise TypeError(f"engine='julia' supports float32 and float64 states; got {dtype}")
    if length == 0:
        return torch.empty(0, dtype=dtype)
    buf = (_CTYPES[dtype] * length).from_address(address)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.dtype(_CTYPES[dtype])))


class ViewCache:
    """(address, length) → tensor view of a fixed shape; the shape is what the torch side expects.

    `shape_for(length)` chooses the shape of a buffer from its length (states, Jacobians and
    parameter vectors have different lengths), so one cache serves every callback of a solve.
    A small bound keeps the cache from growing if a solver ever allocates fresh arrays.
    """

    def __init__(self, dtype: torch.dtype, shape_for, max_entries: int = 256):
        self.dtype = dtype
        self.shape_for = shape_for
        self.max_entries = max_entries
        self._views: dict = {}
        self.created = 0  # how many views were made (the benchmark and tests read this)

    def __call__(self, address: int, length: int) -> torch.Tensor:
        key = (address, length)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.max_entries:
                self._views.clear()
            view = view_at(address, length, self.dtype).view(self.shape_for(length))
            self._views[key] = view
            self.created += 1
        return view

    def clear(self):
        self._views.clear()


def from_julia_array(arr, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor over an array Julia returned (juliacall's ArrayValue exposes the buffer
    protocol), reversed axes so that a Julia (n, B, T) array reads as torch (T, B, n).

    No copy when the memory is a strided float array of the right dtype; the numpy array keeps the
    Julia object alive for as long as the tensor lives.
    """
    a = np.asarray(arr)
    if a.dtype != np.dtype(_CTYPES[dtype]):
        a = a.astype(np.dtype(_CTYPES[dtype]))
    return torch.from_numpy(a.T) if a.ndim > 1 else torch.from_numpy(a)


def address_of(t: torch.Tensor) -> tuple:
    """(address, length) of a contiguous CPU tensor, as Julia's `unsafe_wrap` needs them."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("internal: expected a contiguous CPU tensor")
    return t.data_ptr(), t.numel()
