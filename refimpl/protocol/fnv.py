"""FNV-1a, 64-bit: the content hash of the tensor cache (spec/hash-cache.md).

``hash = 0xcbf29ce484222325; for each byte b: hash = (hash XOR b) * 0x100000001b3 mod 2**64``.

:func:`fnv1a_64_reference` is the plain definition (the test oracle); :func:`fnv1a_64` is the
numba-compiled version used on payloads of many megabytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a_64_reference(data) -> int:
    """The definition, one byte at a time in Python (slow; for tests and tiny inputs)."""
    h = FNV_OFFSET_BASIS
    for b in bytes(data):
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


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
