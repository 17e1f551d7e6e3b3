"""FNV-1a, 64-bit: the content hash of the tensor cache (spec/hash-cache.md).

``hash = 0xcbf29ce484222325; for each byte b: hash = (hash XOR b) * 0x100000001b3 mod 2**64``.

:func:`fnv1a_64_reference` is the plain definition (the test oracle, fine for small inputs).
The compiled version used on payloads of many megabytes is :func:`refimpl.hashing.fnv1a_64`,
outside the protocol core so that the core needs nothing beyond the standard library and numpy.
"""

from __future__ import annotations

__all__ = ["FNV_OFFSET_BASIS", "FNV_PRIME", "fnv1a_64_reference"]

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a_64_reference(data) -> int:
    """The definition, one byte at a time in Python (slow; for tests and tiny inputs)."""
    h = FNV_OFFSET_BASIS
    for b in bytes(data):
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h
