"""MUL_MAT's fast kernels (spec/ops/matmul.md, "Kernels"; numerics: spec/numerics.md).

The numerics contract asks MUL_MAT for test-backend-ops' bound, not for ggml's order of
operations, so refimpl computes a product the way that is fastest from Python, in two ways:

* **Few activation rows** (generation: one token per graph): one dot product per output,
  straight on the packed weight blocks.  Per block, the exact integer sum of the weight codes
  times the int8 activations (refimpl.kernels.simd: a vector multiply-add, as ggml's SIMD
  code), then one float32 step ``acc += (d_w · d_a) · sum`` (Q4_1 adds ``m_w · s_a``; Q4_K and
  Q6_K weigh their sub-block sums with their integer scales first).  Q4_0's offset of 8 comes
  out exactly as ``8 · Σa``.  Nothing is unpacked into scratch.
* **Many activation rows** (prompt processing): the weights are decoded to float32
  (``code · d``: exact in float32), the quantised activations likewise, and the product is one
  BLAS ``sgemm`` per batch (numpy's ``matmul``).  Every product of two decoded values is a
  product of ggml's own operands; only the order of the float32 sums differs.

Activations are quantised exactly as ggml does (refimpl.kernels.quants): that is part of the
op's semantics, not of its order of operations.  Float weights (F32, F16, BF16) always take
BLAS, with the activations rounded to the weights' precision first, as ggml converts them.

The plain-numpy reference of every product is :func:`refimpl.kernels.matmul.reference`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quants import F16_TABLE, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, _k4_scale_min
from .simd import (decode_i8_32, decode_nibbles16_pair, decode_nibbles32, decode_q6_16,
                   dot_i8_32, dot_nibbles16_pair, dot_nibbles32, dot_q6_16)

#: Weight types with a packed-block dot product and a fast decoder here.
FAST_QUANT_TYPES = frozenset({Q4_0, Q4_1, Q8_0, Q4_K, Q6_K})

#: Weight rows per parallel job.
ROWS_PER_JOB = 16


@njit(cache=True, nogil=True, inline="always")
def _f16(row, o):
    """The half-precision value stored little-endian at ``row[o:o+2]``, as float32."""
    return F16_TABLE[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]


# ------------------------------------------------------------------------------------------
# one output: a packed weight row against one quantised activation row


@njit(cache=True, nogil=True)
def dot_row(code, row, aq, ad, asum, aint, bsums):
    """One output of a product: packed weight ``row`` (uint8) of ``code`` against one
    activation row quantised to that type's format: ``aq`` int8 values, ``ad`` the scale of
    each block, ``asum`` Q8_1's ``s`` per block, ``aint`` the integer sum of each 32 values
    (Q8_0) and ``bsums`` of each 16 (Q8_K)."""
    rp = row.ctypes.data
    ap = aq.ctypes.data
    acc = np.float32(0.0)
    if code == Q4_0:
        for b in range(ad.shape[0]):
            s = dot_nibbles16_pair(rp + 18 * b + 2, ap + 32 * b) - 8 * aint[b]
            acc += (_f16(row, 18 * b) * ad[b]) * np.float32(s)
    elif code == Q4_1:
        for b in range(ad.shape[0]):
            s = dot_nibbles16_pair(rp + 20 * b + 4, ap + 32 * b)
            acc += (_f16(row, 20 * b) * ad[b]) * np.float32(s) + _f16(row, 20 * b + 2) * asum[b]
    elif code == Q8_0:
        for b in range(ad.shape[0]):
            s = dot_i8_32(rp + 34 * b + 2, ap + 32 * b)
            acc += (_f16(row, 34 * b) * ad[b]) * np.float32(s)
    elif code == Q4_K:
        for b in range(ad.shape[0]):
            o = 144 * b
            isum = 0
            msum = 0
            for j in range(4):
                a0 = ap + 256 * b + 64 * j
                s0 = dot_nibbles32(rp + o + 16 + 32 * j, 0, a0)
                s1 = dot_nibbles32(rp + o + 16 + 32 * j, 4, a0 + 32)
                sc0, mn0 = _k4_scale_min(row[o + 4:o + 16], 2 * j)
                sc1, mn1 = _k4_scale_min(row[o + 4:o + 16], 2 * j + 1)
                g = 16 * b + 4 * j
                isum += sc0 * s0 + sc1 * s1
                msum += mn0 * (bsums[g] + bsums[g + 1]) + mn1 * (bsums[g + 2] + bsums[g + 3])
            acc += ad[b] * (_f16(row, o) * np.float32(isum)
                            - _f16(row, o + 2) * np.float32(msum))
    else:   # Q6_K
        for b in range(ad.shape[0]):
            o = 210 * b
            isum = 0
            for n in range(2):
                ql = rp + o + 64 * n
                qh = rp + o + 128 + 32 * n
                sc = o + 192 + 8 * n
                e = ap + 256 * b + 128 * n
                for h in range(2):
                    t0 = dot_q6_16(ql + 16 * h, 0, qh + 16 * h, 0, e + 16 * h)
                    t1 = dot_q6_16(ql + 32 + 16 * h, 0, qh + 16 * h, 2, e + 32 + 16 * h)
                    t2 = dot_q6_16(ql + 16 * h, 4, qh + 16 * h, 4, e + 64 + 16 * h)
                    t3 = dot_q6_16(ql + 32 + 16 * h, 4, qh + 16 * h, 6, e + 96 + 16 * h)
                    isum += (np.int8(row[sc + h]) * t0 + np.int8(row[sc + h + 2]) * t1
                             + np.int8(row[sc + h + 4]) * t2 + np.int8(row[sc + h + 6]) * t3)
            acc += ad[b] * (_f16(row, o + 208) * np.float32(isum))
    return acc


@njit(parallel=True, cache=True, nogil=True)
def mm_packed(code, w, aq, ad, asum, aint, bsums, out):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of a FAST_QUANT_TYPES ``code``
    times quantised activations (per row m = (batch, token): ``aq`` int8 (M, K), ``ad``,
    ``asum``, ``aint``, ``bsums`` as :func:`dot_row` takes them) into ``out`` float32
    (B3, B2, T, N); src0 is broadcast over the batches.  Parallel over slices of weight rows;
    each row meets every activation row of its batch while it is in cache."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    r3, r2 = b3 // a3, b2 // a2
    chunks = (n + ROWS_PER_JOB - 1) // ROWS_PER_JOB
    for job in prange(b3 * b2 * chunks):
        g = job // chunks
        r0 = (job - g * chunks) * ROWS_PER_JOB
        i13, i12 = g // b2, g % b2
        for r in range(r0, min(n, r0 + ROWS_PER_JOB)):
            row = w[i13 // r3, i12 // r2, r]
            for t in range(nt):
                m = g * nt + t
                out[i13, i12, t, r] = dot_row(code, row, aq[m], ad[m], asum[m], aint[m],
                                              bsums[m])


# ------------------------------------------------------------------------------------------
# decoding weight rows to float32 (the BLAS path)


@njit(cache=True, nogil=True)
def decode_row(code, row, out):
    """Packed weight ``row`` of a FAST_QUANT_TYPES ``code`` as float32 values into ``out``
    (contiguous), exactly as ggml's ``dequantize_row_*`` gives them, except that Q4_1's
    minimum is left out: ggml pairs it with the activations' stored block sum ``s``
    (:func:`block_mins`)."""
    rp = row.ctypes.data
    op = out.ctypes.data
    if code == Q4_0:
        for b in range(out.shape[0] // 32):
            decode_nibbles16_pair(rp + 18 * b + 2, 8, _f16(row, 18 * b), op + 128 * b)
    elif code == Q4_1:        # the minimum is left out (see block_mins)
        for b in range(out.shape[0] // 32):
            decode_nibbles16_pair(rp + 20 * b + 4, 0, _f16(row, 20 * b), op + 128 * b)
    elif code == Q8_0:
        for b in range(out.shape[0] // 32):
            decode_i8_32(rp + 34 * b + 2, _f16(row, 34 * b), op + 128 * b)
    elif code == Q4_K:
        for b in range(out.shape[0] // 256):
            o = 144 * b
            d, dmin = _f16(row, o), _f16(row, o + 2)
            for j in range(8):
                sc, mn = _k4_scale_min(row[o + 4:o + 16], j)
                first = 256 * b + 32 * j
                decode_nibbles32(rp + o + 16 + 32 * (j // 2), 4 * (j % 2),
                                 d * np.float32(sc), op + 4 * first)
                m = dmin * np.float32(mn)
                for e in range(first, first + 32):
                    out[e] -= m
    else:   # Q6_K
        for b in range(out.shape[0] // 256):
            o = 210 * b
            d = _f16(row, o + 208)
            for n in range(2):
                ql = rp + o + 64 * n
                qh = rp + o + 128 + 32 * n
                sc = o + 192 + 8 * n
                e = op + 4 * (256 * b + 128 * n)
                for h in range(2):
                    decode_q6_16(ql + 16 * h, 0, qh + 16 * h, 0,
                                 d * np.float32(np.int8(row[sc + h])), e + 64 * h)
                    decode_q6_16(ql + 32 + 16 * h, 0, qh + 16 * h, 2,
                                 d * np.float32(np.int8(row[sc + h + 2])), e + 128 + 64 * h)
                    decode_q6_16(ql + 16 * h, 4, qh + 16 * h, 4,
                                 d * np.float32(np.int8(row[sc + h + 4])), e + 256 + 64 * h)
                    decode_q6_16(ql + 32 + 16 * h, 4, qh + 16 * h, 6,
                                 d * np.float32(np.int8(row[sc + h + 6])), e + 384 + 64 * h)


@njit(parallel=True, cache=True, nogil=True)
def decode_rows(code, rows, out):
    """Every row of ``rows`` (uint8 (R, row_bytes)) decoded into ``out`` float32 (R, K)."""
    for r in prange(rows.shape[0]):
        decode_row(code, rows[r], out[r])


def block_mins(rows: np.ndarray, block_bytes: int) -> np.ndarray:
    """The minimum ``m`` (f16 at bytes 2..3 of every block) of Q4_1 or Q5_1 ``rows`` (uint8
    (R, row_bytes)), as float32 (R, blocks)."""
    r, nbytes = rows.shape
    blocks = np.ascontiguousarray(rows).reshape(r, nbytes // block_bytes, block_bytes)
    return blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
