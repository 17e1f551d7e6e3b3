"""The fast FNV-1a 64 for payloads of many megabytes (the hash cache, SET_TENSOR_HASH).

The definition lives in the protocol core (:func:`refimpl.protocol.fnv.fnv1a_64_reference`,
standard library only); this is the same function compiled with numba, kept out of
:mod:`refimpl.protocol` so that the sans-IO core imports without a compiler.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from .protocol.fnv import FNV_OFFSET_BASIS, FNV_PRIME

__all__ = ["fnv1a_64"]


@njit(cache=True, nogil=True)
def _fnv1a_kernel(data):
    h = uint64(FNV_OFFSET_BASIS)
    prime = uint64(FNV_PRIME)
    for i in range(data.shape[0]):
        h = (h ^ uint64(data[i])) * prime
    return h


def fnv1a_64(data) -> int:
    """FNV-1a 64 of any bytes-like object (bytes, bytearray, memoryview, numpy array)."""
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else data.reshape(-1).view(np.uint8)
    return int(_fnv1a_kernel(arr))
