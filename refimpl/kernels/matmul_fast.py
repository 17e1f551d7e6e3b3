"""MUL_MAT's fast kernels: dot products straight on the packed weight blocks.

The numerics contract (spec/numerics.md) asks MUL_MAT for test-backend-ops' bound, not for
ggml's order of operations, so these kernels compute each output the plain way, the way
ggml's own scalar reference code does (``ggml_vec_dot_*_generic``), and leave the rest to the
compiler:

* **32-value block weights** (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_0/Q8_1 activations:
  per block, the exact integer sum of the 32 products, then
  ``acc += (d_w · d_a) · sum`` (plus ``m_w · s_a`` for Q4_1 and Q5_1), block after block.  Nothing is unpacked
  into scratch: each block's bytes are read where they lie, and the 16-byte inner loop is
  contiguous integer arithmetic that LLVM vectorises.
* **k-quant weights** (Q4_K, Q5_K, Q6_K) against Q8_K activations: per 256-value
  super-block the exact integer ``Σ scale · Σ q·a``, the minimums through the activations'
  16-value sums, then one float32 step per super-block.
* **float weights** (F32, F16, BF16): one float32 sum of products per output, which the
  compiler may reassociate into SIMD lanes (``fastmath`` reassoc and contract only, so NaN
  and infinities keep their IEEE meaning).

Activations are converted exactly as before (refimpl.kernels.quants), which is part of ggml's
semantics, not of its order of operations.  One parallel region per product, over slices of
weight rows; each weight row meets every activation row while it is in cache.

A plain-numpy reference of the same product is :func:`refimpl.kernels.matmul.reference`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, _k4_scale_min

#: Weight rows per parallel job.
ROWS_PER_JOB = 16

_FAST = {"reassoc", "contract"}


@njit(cache=True, nogil=True, inline="always")
def _f16(row, o, table):
    """The half-precision value stored at ``row[o:o+2]`` (little-endian), as float32."""
    return table[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]


@njit(cache=True, nogil=True, inline="always")
def _sum_q4(row, o, aq, base):
    """Σ nibble · a over the 32 values of the nibbles at ``row[o:o+16]`` (low nibbles are
    values 0..15 of the block, high nibbles 16..31)."""
    s = np.int32(0)
    for j in range(16):
        v = np.int32(row[o + j])
        s += (v & 15) * np.int32(aq[base + j]) + (v >> 4) * np.int32(aq[base + j + 16])
    return s


@njit(cache=True, nogil=True, inline="always")
def _sum_q5(row, o_qh, o_qs, aq, base):
    """As :func:`_sum_q4` with the fifth bit of every value from the u32 at ``row[o_qh:]``."""
    qh = (np.int32(row[o_qh]) | (np.int32(row[o_qh + 1]) << 8)
          | (np.int32(row[o_qh + 2]) << 16) | (np.int32(row[o_qh + 3]) << 24))
    s = np.int32(0)
    for j in range(16):
        v = np.int32(row[o_qs + j])
        lo = (v & 15) | (((qh >> j) & 1) << 4)
        hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
        s += lo * np.int32(aq[base + j]) + hi * np.int32(aq[base + j + 16])
    return s


@njit(cache=True, nogil=True, inline="always")
def _sum_q8(row, o, aq, base):
    """Σ w · a over the 32 signed bytes at ``row[o:o+32]``."""
    s = np.int32(0)
    for j in range(32):
        s += np.int32(np.int8(row[o + j])) * np.int32(aq[base + j])
    return s


@njit(cache=True, nogil=True)
def dot_q32(code, row, aq, ad, asum, aint, table):
    """One output: a packed row of a 32-value format against one Q8_0/Q8_1 activation row
    (``aq`` int8 values, ``ad`` the block scales, ``asum`` Q8_1's ``s`` per block, ``aint``
    the integer sum of each block's values).  Q4_0's and Q5_0's offsets (8 and 16) are taken
    out of the block sum as ``offset · Σa``, which is exact in integers."""
    acc = np.float32(0.0)
    nb = ad.shape[0]
    if code == Q4_0:
        for b in range(nb):
            o = 18 * b
            s = _sum_q4(row, o + 2, aq, 32 * b) - 8 * aint[b]
            acc += (_f16(row, o, table) * ad[b]) * np.float32(s)
    elif code == Q4_1:
        for b in range(nb):
            o = 20 * b
            s = _sum_q4(row, o + 4, aq, 32 * b)
            acc += (_f16(row, o, table) * ad[b]) * np.float32(s) + _f16(row, o + 2, table) * asum[b]
    elif code == Q5_0:
        for b in range(nb):
            o = 22 * b
            s = _sum_q5(row, o + 2, o + 6, aq, 32 * b) - 16 * aint[b]
            acc += (_f16(row, o, table) * ad[b]) * np.float32(s)
    elif code == Q5_1:
        for b in range(nb):
            o = 24 * b
            s = _sum_q5(row, o + 4, o + 8, aq, 32 * b)
            acc += (_f16(row, o, table) * ad[b]) * np.float32(s) + _f16(row, o + 2, table) * asum[b]
    else:   # Q8_0
        for b in range(nb):
            o = 34 * b
            acc += (_f16(row, o, table) * ad[b]) * np.float32(_sum_q8(row, o + 2, aq, 32 * b))
    return acc


@njit(parallel=True, cache=True, nogil=True)
def mm_q32(code, w, aq, ad, asum, aint, out, table):
    """Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) times
    Q8_0/Q8_1 activations (``aq`` int8 (B3*B2*T, K); per block ``ad`` and ``asum`` float32,
    ``aint`` int32) into ``out`` float32 (B3, B2, T, N); src0 is broadcast over the batches."""
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
                out[i13, i12, t, r] = dot_q32(code, row, aq[m], ad[m], asum[m], aint[m], table)


def block_sums(qs: np.ndarray) -> np.ndarray:
    """The integer sum of every 32 activation values (int32 (m, K/32))."""
    m, k = qs.shape
    return qs.reshape(m, k // 32, 32).sum(axis=2, dtype=np.int32)


# -- k-quants: Q4_K, Q5_K, Q6_K against Q8_K activations ------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _sum_k4(row, o_qs, o_qh, five, aq, base, j):
    """The two 32-value sub-blocks ``2j`` and ``2j+1`` of a Q4_K (or, with ``five``, Q5_K)
    super-block: (Σ q·a over sub-block 2j, Σ q·a over sub-block 2j+1).  Value ``64j + l``
    is the low nibble of ``qs[32j + l]``, value ``64j + 32 + l`` the high nibble; Q5_K adds
    bit ``2j`` (``2j+1``) of ``qh[l]`` as the fifth bit."""
    s0 = np.int32(0)
    s1 = np.int32(0)
    for l in range(32):
        v = np.int32(row[o_qs + 32 * j + l])
        lo = v & 15
        hi = v >> 4
        if five:
            h = np.int32(row[o_qh + l])
            lo |= ((h >> (2 * j)) & 1) << 4
            hi |= ((h >> (2 * j + 1)) & 1) << 4
        s0 += lo * np.int32(aq[base + 64 * j + l])
        s1 += hi * np.int32(aq[base + 64 * j + 32 + l])
    return s0, s1


@njit(cache=True, nogil=True)
def dot_kquant(code, row, aq, ad, bsums, table):
    """One output: a packed Q4_K, Q5_K or Q6_K row against one Q8_K activation row (``aq``
    int8 values, ``ad`` float32 per 256, ``bsums`` the integer sum of every 16 values).
    Per super-block the integer ``Σ scale · Σ q·a`` is exact; then, in float32,
    ``acc += d_a · (d_w · isum − dmin_w · Σ min · Σa)`` (no minimum for Q6_K, whose offset of
    32 comes out of the integer sum as ``32 · Σ scale · Σa``)."""
    acc = np.float32(0.0)
    for b in range(ad.shape[0]):
        base = 256 * b
        g0 = 16 * b
        if code == Q6_K:
            o = 210 * b
            isum = np.int32(0)
            for n in range(2):
                ql = o + 64 * n
                qh = o + 128 + 32 * n
                e = base + 128 * n
                for half in range(2):           # values l = 16·half .. 16·half + 15
                    t0 = np.int32(0)
                    t1 = np.int32(0)
                    t2 = np.int32(0)
                    t3 = np.int32(0)
                    for i in range(16):
                        l = 16 * half + i
                        la = np.int32(row[ql + l])
                        lb = np.int32(row[ql + l + 32])
                        h = np.int32(row[qh + l])
                        t0 += ((la & 15) | ((h & 3) << 4)) * np.int32(aq[e + l])
                        t1 += ((lb & 15) | (((h >> 2) & 3) << 4)) * np.int32(aq[e + l + 32])
                        t2 += ((la >> 4) | (((h >> 4) & 3) << 4)) * np.int32(aq[e + l + 64])
                        t3 += ((lb >> 4) | (((h >> 6) & 3) << 4)) * np.int32(aq[e + l + 96])
                    sc = o + 192 + 8 * n + half
                    isum += (np.int32(np.int8(row[sc])) * t0 + np.int32(np.int8(row[sc + 2])) * t1
                             + np.int32(np.int8(row[sc + 4])) * t2
                             + np.int32(np.int8(row[sc + 6])) * t3)
            off = np.int32(0)
            for g in range(16):
                off += np.int32(np.int8(row[o + 192 + g])) * bsums[g0 + g]
            acc += ad[b] * (_f16(row, o + 208, table) * np.float32(isum - 32 * off))
        else:
            five = code == Q5_K
            o = (176 if five else 144) * b
            o_qs = o + (48 if five else 16)
            isum = np.int32(0)
            msum = np.int32(0)
            for j in range(4):
                s0, s1 = _sum_k4(row, o_qs, o + 16, five, aq, base, j)
                sc0, mn0 = _k4_scale_min(row[o + 4:o + 16], 2 * j)
                sc1, mn1 = _k4_scale_min(row[o + 4:o + 16], 2 * j + 1)
                isum += sc0 * s0 + sc1 * s1
                msum += (mn0 * (bsums[g0 + 4 * j] + bsums[g0 + 4 * j + 1])
                         + mn1 * (bsums[g0 + 4 * j + 2] + bsums[g0 + 4 * j + 3]))
            acc += ad[b] * (_f16(row, o, table) * np.float32(isum)
                            - _f16(row, o + 2, table) * np.float32(msum))
    return acc


@njit(parallel=True, cache=True, nogil=True)
def mm_kquant(code, w, aq, ad, bsums, out, table):
    """Q4_K, Q5_K or Q6_K weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) times Q8_K
    activations (``aq`` int8 (B3*B2*T, K), ``ad`` float32 per 256, ``bsums`` int32 per 16)
    into ``out`` float32 (B3, B2, T, N); src0 is broadcast over the batches."""
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
                out[i13, i12, t, r] = dot_kquant(code, row, aq[m], ad[m], bsums[m], table)


#: k-quants with a fast kernel (Q2_K and Q3_K keep refimpl.kernels.matmul's).
FAST_K_TYPES = frozenset({Q4_K, Q5_K, Q6_K})


# -- float weights ---------------------------------------------------------------------------

@njit(cache=True, nogil=True, fastmath=_FAST)
def _dot_f32(w, x):
    """Σ w · x in float32, reassociated freely by the compiler."""
    s = np.float32(0.0)
    for i in range(w.shape[0]):
        s += w[i] * x[i]
    return s


@njit(cache=True, nogil=True, fastmath=_FAST)
def _dot_half(w, x, table):
    """Σ table[w] · x: half-precision weights (F16 or BF16 bit patterns) widened by table."""
    s = np.float32(0.0)
    for i in range(w.shape[0]):
        s += table[w[i]] * x[i]
    return s


def _dot_row(row, x, table):
    """One output of a float-weight product (dispatched on the weights' dtype when compiled)."""
    raise NotImplementedError("only called from compiled kernels")


@overload(_dot_row, inline="always")
def _dot_row_impl(row, x, table):
    if row.dtype == types.float32:
        return lambda row, x, table: _dot_f32(row, x)
    return lambda row, x, table: _dot_half(row, x, table)


@njit(parallel=True, cache=True, nogil=True)
def mm_float(w, x, out, table):
    """Float weights ``w`` ((A3, A2, N, K): float32, or the uint16 bit patterns of F16/BF16
    values widened through ``table``) times float32 activations ``x`` ((B3*B2*T, K), already
    rounded to the weights' precision) into ``out`` float32 (B3, B2, T, N)."""
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
                out[i13, i12, t, r] = _dot_row(row, x[g * nt + t], table)
