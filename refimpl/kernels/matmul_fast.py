"""MUL_MAT's fast kernels (spec/ops/matmul.md, "Kernels"; numerics: spec/numerics.md).

The numerics contract asks MUL_MAT for test-backend-ops' bound, not for ggml's order of
operations, so refimpl computes a product the way that is fastest from Python:

* **Quantised weights of the packed formats**, whatever the number of activation rows: one
  dot product per output, straight on the packed weight blocks, as ggml's SIMD code computes
  it (refimpl.kernels.simd's ``row_dot_*``): per block eight int32 lanes of exact sums of
  products of the codes with the int8 activations, scaled by ``d_w · d_a`` into eight float32
  lanes (Q4_1 and Q5_1 add ``m_w · s_a``; the k-quants weigh their groups' sums with their
  integer scales first).  Four activation rows at a time (``row_dots4_*``: prompts), each
  weight block is decoded once for all four, as ggml's matrix kernels reuse it; every output
  is still the one-row product, bit for bit; two or three rows left over take ``row_dots2_*``
  (a prompt of a few tokens, the client's two-token warm-up).  Nothing is unpacked into
  scratch.  Prompts (16 activation rows and more) on AVX-512 VNNI hosts take tiles instead
  (refimpl.kernels.tiles: each 16 weight rows decoded once, ``vpdpbusd`` over them).
* **F16 and F32 weights** with few activation rows: sixteen float32 lanes of products a row
  (:func:`mm_f16`, widened by the CPU; :func:`mm_f32`).

Activations are quantised exactly as ggml does (refimpl.kernels.quants): that is part of the
op's semantics, not of its order of operations.  Float weights (F32, F16, BF16) otherwise take
BLAS (refimpl.kernels.matmul), with the activations rounded to the weights' precision first, as
ggml converts them.

The plain-numpy reference of every product is :func:`refimpl.kernels.matmul.reference`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .tiles import mm_tiles, tiles_pay
from .parallel import renamed_copy, sized_kernel
from .quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .simd import (ROWS_AT_ONCE, row_dot_f16, row_dot_f32, row_dot_q4_0, row_dot_q4_1,
                   row_dot_q4_k, row_dot_q5_0, row_dot_q5_1, row_dot_q5_k, row_dot_q6_k,
                   row_dot_q8_0,
                   row_dots2_q4_0, row_dots2_q4_1, row_dots2_q4_k, row_dots2_q5_0,
                   row_dots2_q5_1, row_dots2_q5_k, row_dots2_q6_k, row_dots2_q8_0,
                   row_dots4_q4_0, row_dots4_q4_1, row_dots4_q4_k, row_dots4_q5_0,
                   row_dots4_q5_1, row_dots4_q5_k, row_dots4_q6_k, row_dots4_q8_0, store_f32)


#: Weight bytes times activation rows below which a product runs in the calling thread (a
#: one-token step's output has only N values, yet reads all of the weights: it is measured by
#: its weights, not its output).
PACKED_SERIAL_BELOW = 1 << 16

#: Weight rows per parallel job.
ROWS_PER_JOB = 64

#: Activation rows per parallel job (a multiple of four): a prompt's product is split over
#: activation rows too, so that the small products of a prompt (a K/V projection has 192 or
#: 512 weight rows, three to eight jobs of weight rows alone) keep every thread busy.
TOKENS_PER_JOB = 32


def _packed_work(w, aq, *_):
    """The work of one packed product: weight bytes times activation rows."""
    return w.size * aq.shape[0]


# ------------------------------------------------------------------------------------------
# one output: a packed weight row against one quantised activation row


# Every output of the packed kernel is one call of a row intrinsic of refimpl.kernels.simd,
# given a packed weight row and one activation row quantised to the format's partner: its int8
# values, the scale of each block, and the format's extra (Q8_1's stored ``s`` per block for
# Q4_1 and Q5_1; Q8_K's integer sums of each 16 values for Q4_K's minimums).


def _mm_packed(w, aq, ad, asum, bsums, out, table):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of one packed format times quantised
    activations (per row m = (batch, token): ``aq`` int8 (M, K), ``ad`` their block scales,
    ``asum`` Q8_1's block sums, ``bsums`` Q8_K's sums of 16) into ``out`` float32 (B3, B2, T,
    N), which may have any strides; src0 is broadcast over the batches.  Parallel over slices
    of weight rows; within a slice, activation rows four at a time, then two, then one (the
    few activation rows stay in cache), and over slices of TOKENS_PER_JOB activation rows
    where there are more.  Every output is the same however the rows are grouped (the row
    intrinsics agree bit for bit).  ``ROW_DOT``, ``ROW_DOTS2``, ``ROW_DOTS4`` and
    ``SUMS_OF_16`` are globals that :func:`_for_each_format` binds: one compiled kernel per
    format.  ``asum`` must have a column per block and ``bsums`` a row per activation row
    even where unused."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    r3, r2 = b3 // a3, b2 // a2
    chunks = (n + ROWS_PER_JOB - 1) // ROWS_PER_JOB
    tchunks = max(1, (nt + TOKENS_PER_JOB - 1) // TOKENS_PER_JOB)
    # raw addresses and strides, taken once: a view made per row inside the parallel loop
    # would count references on the shared arrays atomically (refimpl.kernels.parallel)
    wp, ws3, ws2, ws1 = w.ctypes.data, w.strides[0], w.strides[1], w.strides[2]
    op, os3, os2, os1 = out.ctypes.data, out.strides[0], out.strides[1], out.strides[2]
    os0 = out.strides[3]
    ap0, as0 = aq.ctypes.data, aq.strides[0]
    dp0, ds0 = ad.ctypes.data, ad.strides[0]
    if SUMS_OF_16:              # the format's extra argument
        xp0, xs0 = bsums.ctypes.data, bsums.strides[0]
    else:
        xp0, xs0 = asum.ctypes.data, asum.strides[0]
    tp, nb = table.ctypes.data, ad.shape[1]
    for job in prange(b3 * b2 * chunks * tchunks):
        g = job // (chunks * tchunks)
        c = job - g * chunks * tchunks
        r0 = (c // tchunks) * ROWS_PER_JOB
        r1 = min(n, r0 + ROWS_PER_JOB)
        t0 = (c % tchunks) * TOKENS_PER_JOB
        te = min(nt, t0 + TOKENS_PER_JOB)
        i13, i12 = g // b2, g % b2
        wb = wp + (i13 // r3) * ws3 + (i12 // r2) * ws2
        o = op + i13 * os3 + i12 * os2
        while t0 + ROWS_AT_ONCE <= te:
            m = g * nt + t0
            ap, dp, xp = ap0 + m * as0, dp0 + m * ds0, xp0 + m * xs0
            for r in range(r0, r1):
                ROW_DOTS4(wb + r * ws1, ap, as0, dp, ds0, xp, xs0, nb, tp,
                          o + t0 * os1 + r * os0, os1)
            t0 += ROWS_AT_ONCE
        if t0 + 2 <= te:        # two or three rows left (a short prompt, a warm-up)
            m = g * nt + t0
            ap, dp, xp = ap0 + m * as0, dp0 + m * ds0, xp0 + m * xs0
            for r in range(r0, r1):
                ROW_DOTS2(wb + r * ws1, ap, as0, dp, ds0, xp, xs0, nb, tp,
                          o + t0 * os1 + r * os0, os1)
            t0 += 2
        for t in range(t0, te):
            m = g * nt + t
            ap, dp, xp = ap0 + m * as0, dp0 + m * ds0, xp0 + m * xs0
            for r in range(r0, r1):
                store_f32(o + t * os1 + r * os0, ROW_DOT(wb + r * ws1, ap, dp, xp, nb, tp))


# (bound per compiled copy of _mm_packed)
ROW_DOT = ROW_DOTS2 = ROW_DOTS4 = None
SUMS_OF_16 = False

#: Per packed format: its one-row, two-row and four-row intrinsics, and whether their extra
#: argument is Q8_K's sums of 16 (else Q8_1's block sums, unused but for Q4_1 and Q5_1).
_ROW_DOTS = {
    Q4_0: (row_dot_q4_0, row_dots2_q4_0, row_dots4_q4_0, False),
    Q4_1: (row_dot_q4_1, row_dots2_q4_1, row_dots4_q4_1, False),
    Q5_0: (row_dot_q5_0, row_dots2_q5_0, row_dots4_q5_0, False),
    Q5_1: (row_dot_q5_1, row_dots2_q5_1, row_dots4_q5_1, False),
    Q8_0: (row_dot_q8_0, row_dots2_q8_0, row_dots4_q8_0, False),
    Q4_K: (row_dot_q4_k, row_dots2_q4_k, row_dots4_q4_k, True),
    Q5_K: (row_dot_q5_k, row_dots2_q5_k, row_dots4_q5_k, True),
    Q6_K: (row_dot_q6_k, row_dots2_q6_k, row_dots4_q6_k, True),
}

#: Weight types with a packed-block dot product here (:func:`mm_packed`).
PACKED_TYPES = frozenset(_ROW_DOTS)


def _for_each_format(fn, **options):
    """One kernel per format: a copy of ``fn`` for each format of :data:`_ROW_DOTS` whose
    globals bind ``ROW_DOT``, ``ROW_DOTS2``, ``ROW_DOTS4`` and ``SUMS_OF_16`` to the format's,
    so that numba compiles one format's loop alone (one function with every format's branch ran the
    hot loop at half the speed); each copy has its own name, so numba's on-disk cache keeps
    them apart."""
    kernels = {}
    for code, (one, two, four, sums16) in _ROW_DOTS.items():
        twin = renamed_copy(fn, f"_{code}", ROW_DOT=one, ROW_DOTS2=two, ROW_DOTS4=four,
                            SUMS_OF_16=sums16)
        kernels[code] = sized_kernel(0, PACKED_SERIAL_BELOW, work=_packed_work,
                                     **options)(twin)
    return kernels


_PACKED_KERNELS = _for_each_format(_mm_packed, cache=True, nogil=True)


def mm_packed(code, w, aq, ad, asum, bsums, out, table):
    """The product of weights ``w`` of a PACKED_TYPES ``code`` with quantised activations
    into ``out`` (:func:`_mm_packed`, compiled for ``code``; a prompt's product tile by tile
    where that pays, refimpl.kernels.tiles)."""
    if tiles_pay(code, out.shape[2]):
        mm_tiles(code, w, aq, ad, asum, bsums, out, table)
    else:
        _PACKED_KERNELS[code](w, aq, ad, asum, bsums, out, table)


def _mm_float(w, x, out, table):
    """Float weights ``w`` ((A3, A2, N, K), each row contiguous: F16 bit patterns as uint16,
    or float32) times float32 activations ``x`` ((M, K), already rounded to the weights'
    precision as ggml converts them) into ``out`` float32 (B3, B2, T, N), any strides: per
    output, sixteen float32 lanes of products (``ROW_DOT``: :func:`.simd.row_dot_f16`, for
    which the CPU must have F16C, or :func:`.simd.row_dot_f32`), the last ``K % 16`` widened
    by ``WIDEN`` (through ``table`` for F16).  Parallel by the size of the weights (as
    :func:`_mm_packed`, whose note on views in the parallel loop holds here too)."""
    a3, a2, n, k = w.shape
    b3, b2, nt, _ = out.shape
    r3, r2 = b3 // a3, b2 // a2
    k16 = k - k % 16
    chunks = (n + ROWS_PER_JOB - 1) // ROWS_PER_JOB
    wp, ws3, ws2, ws1 = w.ctypes.data, w.strides[0], w.strides[1], w.strides[2]
    xp0, xs0 = x.ctypes.data, x.strides[0]
    for job in prange(b3 * b2 * chunks):
        g = job // chunks
        r0 = (job - g * chunks) * ROWS_PER_JOB
        i13, i12 = g // b2, g % b2
        j3, j2 = i13 // r3, i12 // r2
        for t in range(nt):
            m = g * nt + t
            xp = xp0 + m * xs0
            for r in range(r0, min(n, r0 + ROWS_PER_JOB)):
                acc = ROW_DOT(wp + j3 * ws3 + j2 * ws2 + r * ws1, xp, k)
                for i in range(k16, k):
                    acc += WIDEN(table, w[j3, j2, r, i]) * x[m, i]
                out[i13, i12, t, r] = acc


WIDEN = None        # bound per copy by _float_kernel, as ROW_DOT is


@njit(inline="always")
def _f16_value(table, bits):
    return table[bits]


@njit(inline="always")
def _f32_value(table, value):
    return value


#: Weight elements below which a float product runs in the calling thread.
FLOAT_SERIAL_BELOW = 1 << 15


def _float_kernel(suffix, row_dot, widen):
    """:func:`_mm_float` with one weight format's ``ROW_DOT`` and ``WIDEN``, compiled serial
    and parallel."""
    twin = renamed_copy(_mm_float, suffix, ROW_DOT=row_dot, WIDEN=widen)
    return sized_kernel(0, FLOAT_SERIAL_BELOW, cache=True, nogil=True)(twin)


#: F16 weights (uint16 bit patterns) times activations rounded to F16: :func:`_mm_float`.
mm_f16 = _float_kernel("_f16", row_dot_f16, _f16_value)

#: F32 weights times float32 activations: :func:`_mm_float` (``table`` unused: pass None).
mm_f32 = _float_kernel("_f32", row_dot_f32, _f32_value)


# ------------------------------------------------------------------------------------------
# the BLAS path's help with Q5_1 (refimpl.kernels.matmul._blas)


def block_mins(rows: np.ndarray, block_bytes: int) -> np.ndarray:
    """The minimum ``m`` (f16 at bytes 2..3 of every block) of Q4_1 or Q5_1 ``rows`` (uint8
    (R, row_bytes)), as float32 (R, blocks)."""
    r, nbytes = rows.shape
    blocks = np.ascontiguousarray(rows).reshape(r, nbytes // block_bytes, block_bytes)
    return blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
