"""Float rows into block formats, as ggml's CPU backend stores them: what SET_ROWS and CPY
write into a quantised tensor (a quantised KV cache, ``-ctk q8_0``) (spec/ops/set_rows.md,
spec/ops/copy.md).  The other block formats refimpl quantises into are :mod:`.quants_more`'s
(IQ4_NL, IQ4_XS, the FP4 and ternary ones) and :mod:`.quantize_k`'s (the k-quants Q2_K …
Q6_K); :func:`quantize_into` takes any of them.

ggml quantises a row with its type's ``from_float``; for the formats here (layouts in
spec/ops/matmul.md, "Block formats"), per 32 values:

* Q8_0: ``d = amax/127`` (stored as F16), ``q = rint(x · 127/amax)`` (ties to even, as the
  x86 build rounds; the same as the Q8_0 activations of :func:`.quants.quantize_q8_32`);
* Q4_0 / Q5_0: ``m`` the value of largest magnitude (the first such), ``d = m / -8`` (``-16``),
  ``q = min(15, trunc(x/d + 8.5))`` (``min(31, trunc(x/d + 16.5))``), with ``1/d`` taken once;
* Q4_1 / Q5_1: ``d = (max - min)/15`` (``/31``), ``m = min``, ``q = trunc((x - min)/d + 0.5)``
  (capped at 15 for Q4_1).

``trunc`` is C's conversion of a float to an integer.  Values that are not finite have no
meaningful code; they are stored as ggml's x86 build stores them where the result is defined,
and as code 0 otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.validators.types import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QUANTIZE_TYPES  # noqa: F401
from ..protocol.ggml_types import type_traits
from . import quantize_k, quants_more
from .numeric import f16_bits
from .parallel import sized_kernel

#: The formats :func:`quantize_row` writes; the others of QUANTIZE_TYPES are
#: :func:`.quantize_k.quantize_rows`' (k-quants) and :func:`.quants_more.quantize_rows`'.
_HERE = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1})


@njit(cache=True, nogil=True, inline="always")
def _put_f16(out, o, x):
    bits = f16_bits(x)
    out[o] = bits & 0xFF
    out[o + 1] = bits >> 8


@njit(cache=True, nogil=True, inline="always")
def _code(v, top):
    """C's ``MIN(top, (int8_t) v)`` for the values the reference quantisers produce (0 for a
    value without an integer: NaN)."""
    if not (v > -129.0 and v < 128.0):
        return 0
    return min(top, max(0, np.int32(v)))


@njit(cache=True, nogil=True)
def quantize_row(code, x, out):
    """Quantise the float32 row ``x`` (a multiple of 32 values) into the packed blocks ``out``
    (uint8, the row's bytes) of format ``code`` (one of :data:`QUANTIZE_TYPES`)."""
    f32 = np.float32
    nbytes = 34 if code == Q8_0 else 18 if code == Q4_0 else 20 if code == Q4_1 else \
        22 if code == Q5_0 else 24
    for b in range(x.shape[0] // 32):
        v = x[b * 32:b * 32 + 32]
        o = b * nbytes
        if code == Q8_0:
            amax = f32(0.0)
            for i in range(32):
                if abs(v[i]) > amax:
                    amax = abs(v[i])
            inv = f32(127.0) / amax if amax != 0 else f32(0.0)
            _put_f16(out, o, amax / f32(127.0))
            for i in range(32):
                q = np.rint(v[i] * inv)
                qi = -128 if q != q else 127 if q > 127.0 else -128 if q < -128.0 else np.int32(q)
                out[o + 2 + i] = np.uint8(qi & 0xFF)
        elif code == Q4_0 or code == Q5_0:
            amax = f32(0.0)
            m = f32(0.0)
            for i in range(32):
                if amax < abs(v[i]):
                    amax = abs(v[i])
                    m = v[i]
            half = 8 if code == Q4_0 else 16
            d = m / f32(-half)
            inv = f32(1.0) / d if d != 0 else f32(0.0)
            _put_f16(out, o, d)
            qs = o + 2 if code == Q4_0 else o + 6
            qh = 0
            for j in range(16):
                lo = _code(v[j] * inv + f32(half + 0.5), 2 * half - 1)
                hi = _code(v[j + 16] * inv + f32(half + 0.5), 2 * half - 1)
                out[qs + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
                qh |= ((lo >> 4) & 1) << j
                qh |= ((hi >> 4) & 1) << (j + 16)
            if code == Q5_0:
                for i in range(4):
                    out[o + 2 + i] = np.uint8((qh >> (8 * i)) & 0xFF)
        else:                                       # Q4_1, Q5_1
            lo_v = f32(math.inf)
            hi_v = f32(-math.inf)
            for i in range(32):
                if v[i] < lo_v:
                    lo_v = v[i]
                if v[i] > hi_v:
                    hi_v = v[i]
            steps = 15 if code == Q4_1 else 31
            d = (hi_v - lo_v) / f32(steps)
            inv = f32(1.0) / d if d != 0 else f32(0.0)
            _put_f16(out, o, d)
            _put_f16(out, o + 2, lo_v)
            qs = o + 4 if code == Q4_1 else o + 8
            top = 15 if code == Q4_1 else 255
            qh = 0
            for j in range(16):
                lo = _code((v[j] - lo_v) * inv + f32(0.5), top)
                hi = _code((v[j + 16] - lo_v) * inv + f32(0.5), top)
                out[qs + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
                qh |= ((lo >> 4) & 1) << j
                qh |= ((hi >> 4) & 1) << (j + 16)
            if code == Q5_1:
                for i in range(4):
                    out[o + 4 + i] = np.uint8((qh >> (8 * i)) & 0xFF)


@sized_kernel(1, cache=True, nogil=True)
def quantize_rows(code, x, out):
    """:func:`quantize_row` for every row of ``x`` (float32 (m, k)) into ``out`` (uint8
    (m, row_bytes), rows may be strided)."""
    for r in prange(x.shape[0]):
        quantize_row(code, x[r], out[r])


def quantize_into(code: int, x: np.ndarray, out: np.ndarray) -> None:
    """Float32 rows ``x`` (m, k) quantised to any of QUANTIZE_TYPES into ``out`` (uint8
    (m, row_bytes)), as ggml's ``from_float`` quantises them: :func:`quantize_rows` for the
    32-value formats here, :func:`.quantize_k.quantize_rows` for the k-quants,
    :func:`.quants_more.quantize_rows` for IQ4_NL and the others."""
    if code in _HERE:
        quantize_rows(code, x, out)
    elif code in quantize_k.K_QUANT_TYPES:
        quantize_k.quantize_rows(code, np.ascontiguousarray(x), out)
    elif x.shape[0]:
        out[...] = quants_more.quantize_rows(code, x)


def row_bytes(code: int, k: int) -> int:
    """Bytes of a row of ``k`` values in format ``code``."""
    tr = type_traits(code)
    return k // tr.block_size * tr.type_size


def reference(code: int, x: np.ndarray) -> np.ndarray:
    """Numpy oracle: float32 rows ``x`` (m, k) as packed rows (uint8 (m, row_bytes)),
    written independently of :func:`quantize_row` (finite inputs)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    f16 = lambda a: a.astype(np.float16).view(np.uint8).reshape(*a.shape, 2)  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if code == Q8_0:
            amax = np.abs(blocks).max(axis=2, keepdims=True)
            inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
            q = np.clip(np.rint(blocks * inv), -128, 127).astype(np.int8).view(np.uint8)
            parts = [f16(amax[..., 0] / np.float32(127.0)), q]
        elif code in (Q4_0, Q5_0):
            half = 8 if code == Q4_0 else 16
            pick = np.abs(blocks).argmax(axis=2)[..., None]
            m_ = np.take_along_axis(blocks, pick, axis=2)[..., 0]
            d = (m_ / np.float32(-half)).astype(np.float32)
            inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            q = np.minimum(2 * half - 1, np.trunc(blocks * inv[..., None] + np.float32(half + 0.5))
                           ).astype(np.int64)
            parts = [f16(d)]
        else:
            lo, hi = blocks.min(axis=2), blocks.max(axis=2)
            steps = 15 if code == Q4_1 else 31
            d = ((hi - lo) / np.float32(steps)).astype(np.float32)
            inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            q = np.trunc((blocks - lo[..., None]) * inv[..., None] + np.float32(0.5)).astype(np.int64)
            if code == Q4_1:
                q = np.minimum(q, 15)
            parts = [f16(d), f16(lo)]
        if code != Q8_0:
            nib = ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8)
            if code in (Q5_0, Q5_1):
                bits = (q >> 4) & 1
                qh = (bits << np.arange(32)).sum(axis=2).astype(np.uint32)
                parts.append(qh.view(np.uint8).reshape(m, k // 32, 4))
            parts.append(nib)
    return np.concatenate(parts, axis=2).reshape(m, -1)
