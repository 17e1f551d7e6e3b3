"""MUL_MAT's fast kernels (spec/ops/matmul.md, "Kernels"; numerics: spec/numerics.md).

The numerics contract asks MUL_MAT for test-backend-ops' bound, not for ggml's order of
operations, so refimpl computes a product the way that is fastest from Python, in two ways:

* **Few activation rows** (generation: one token per graph): one dot product per output,
  straight on the packed weight blocks, as ggml's SIMD code computes it
  (refimpl.kernels.simd's ``row_dot_*``): per block eight int32 lanes of exact sums of
  products of the codes (offsets already taken off) with the int8 activations, scaled by
  ``d_w · d_a`` into eight float32 lanes (Q4_1 and Q5_1 add ``m_w · s_a``; Q4_K and Q6_K weigh
  their groups' sums with their integer scales first).  F16 weights likewise, widened by the
  CPU.  Nothing is unpacked into scratch.
* **Many activation rows** (prompt processing): the weights are split into their integer codes
  and the scale of every group of 16 or 32 (:func:`split_rows`), the quantised activations
  likewise, and one batched BLAS ``sgemm`` (numpy's ``matmul``) gives the integer sum of every
  group exactly (small integers are exact in float32, in any order); :func:`combine_groups`
  then weighs each by its two scales as ggml's dot products do.  Only the order of the float32
  accumulation over the groups differs from ggml's.

Activations are quantised exactly as ggml does (refimpl.kernels.quants): that is part of the
op's semantics, not of its order of operations.  Float weights (F32, F16, BF16) always take
BLAS, with the activations rounded to the weights' precision first, as ggml converts them.

The plain-numpy reference of every product is :func:`refimpl.kernels.matmul.reference`.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from .parallel import sized_kernel
from .quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, _f16_at, _k4_scale_min
from .simd import (decode_i8_32, decode_nibbles16_pair, decode_nibbles32, decode_q6_16,
                   row_dot_f16, row_dot_q4_0, row_dot_q4_1, row_dot_q4_k, row_dot_q5_0,
                   row_dot_q5_1, row_dot_q5_k, row_dot_q6_k, row_dot_q8_0, store_f32)

#: Weight types with a packed-block dot product here (:func:`mm_packed`) ...
PACKED_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K})
#: ... and those :func:`split_rows` splits into codes and group scales.
FAST_QUANT_TYPES = frozenset({Q4_0, Q4_1, Q8_0, Q4_K, Q6_K})

#: Weight bytes below which a product runs in the calling thread: its work, whatever the
#: number of activation rows (a one-token step's output has only N values, yet reads all of
#: the weights).
PACKED_SERIAL_BELOW = 1 << 16

#: Weight rows per parallel job.
ROWS_PER_JOB = 64


# ------------------------------------------------------------------------------------------
# one output: a packed weight row against one quantised activation row


# Every output of the packed kernel is one call of a row intrinsic of refimpl.kernels.simd,
# given a packed weight row and one activation row quantised to the format's partner: its int8
# values, the scale of each block, and the format's extra (Q8_1's stored ``s`` per block for
# Q4_1 and Q5_1; Q8_K's integer sums of each 16 values for Q4_K's minimums).


def _mm_packed(w, aq, ad, asum, bsums, out, table):
    """Weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) of format ``CODE`` times quantised
    activations (per row m = (batch, token): ``aq`` int8 (M, K), ``ad``, ``asum``, ``bsums``
    as the ``dot_*`` functions take them) into ``out`` float32 (B3, B2, T, N), which may have
    any strides; src0 is broadcast over the batches.  Parallel over slices of weight rows,
    token after token (the few activation rows stay in cache).  ``CODE`` is a global that
    :func:`_for_each_format` binds, one compiled kernel per format.  ``asum`` must have a
    column per block and ``bsums`` a row per activation row even where unused."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    r3, r2 = b3 // a3, b2 // a2
    chunks = (n + ROWS_PER_JOB - 1) // ROWS_PER_JOB
    # raw addresses and strides, taken once: a view made per row inside the parallel loop
    # would count references on the shared arrays atomically (refimpl.kernels.parallel)
    wp, ws3, ws2, ws1 = w.ctypes.data, w.strides[0], w.strides[1], w.strides[2]
    op, os3, os2, os1 = out.ctypes.data, out.strides[0], out.strides[1], out.strides[2]
    os0 = out.strides[3]
    ap0, as0 = aq.ctypes.data, aq.strides[0]
    dp0, ds0 = ad.ctypes.data, ad.strides[0]
    sp0, ss0 = asum.ctypes.data, asum.strides[0]
    bp0, bs0 = bsums.ctypes.data, bsums.strides[0]
    tp, nb = table.ctypes.data, ad.shape[1]
    for job in prange(b3 * b2 * chunks):
        g = job // chunks
        r0 = (job - g * chunks) * ROWS_PER_JOB
        r1 = min(n, r0 + ROWS_PER_JOB)
        i13, i12 = g // b2, g % b2
        wb = wp + (i13 // r3) * ws3 + (i12 // r2) * ws2
        for t in range(nt):
            m = g * nt + t
            ap, dp, sp = ap0 + m * as0, dp0 + m * ds0, sp0 + m * ss0
            bp = bp0 + m * bs0
            o = op + i13 * os3 + i12 * os2 + t * os1
            for r in range(r0, r1):
                rp = wb + r * ws1
                if CODE == Q4_0:
                    store_f32(o + r * os0, row_dot_q4_0(rp, ap, dp, sp, nb, tp))
                elif CODE == Q4_1:
                    store_f32(o + r * os0, row_dot_q4_1(rp, ap, dp, sp, nb, tp))
                elif CODE == Q5_0:
                    store_f32(o + r * os0, row_dot_q5_0(rp, ap, dp, sp, nb, tp))
                elif CODE == Q5_1:
                    store_f32(o + r * os0, row_dot_q5_1(rp, ap, dp, sp, nb, tp))
                elif CODE == Q8_0:
                    store_f32(o + r * os0, row_dot_q8_0(rp, ap, dp, sp, nb, tp))
                elif CODE == Q4_K:
                    store_f32(o + r * os0, row_dot_q4_k(rp, ap, dp, nb, tp, bp))
                elif CODE == Q5_K:
                    store_f32(o + r * os0, row_dot_q5_k(rp, ap, dp, nb, tp, bp))
                else:
                    store_f32(o + r * os0, row_dot_q6_k(rp, ap, dp, nb, tp, bp))


CODE = -1      # (bound per compiled copy of _mm_packed)


def _for_each_format(fn, codes, **options):
    """One kernel per format: a copy of ``fn`` for each of ``codes`` whose globals bind
    ``CODE`` to it, so that numba compiles it as a constant and LLVM sees one format's loop
    alone (one function with every format's branch ran the hot loop at half the speed);
    each copy has its own name, so numba's on-disk cache keeps them apart."""
    kernels = {}
    for code in codes:
        scope = dict(fn.__globals__, CODE=code)
        twin = types.FunctionType(fn.__code__, scope, f"{fn.__name__}_{code}", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = f"{fn.__qualname__}_{code}"
        twin.__module__ = fn.__module__
        twin.__doc__ = fn.__doc__
        kernels[code] = sized_kernel(0, PACKED_SERIAL_BELOW, **options)(twin)
    return kernels


_PACKED_KERNELS = _for_each_format(_mm_packed, PACKED_TYPES, cache=True, nogil=True)


def mm_packed(code, w, aq, ad, asum, bsums, out, table):
    """The product of weights ``w`` of a PACKED_TYPES ``code`` with quantised activations
    into ``out`` (:func:`_mm_packed`, compiled for ``code``)."""
    _PACKED_KERNELS[code](w, aq, ad, asum, bsums, out, table)


@sized_kernel(0, 1 << 15, cache=True, nogil=True)
def mm_f16(w, x, out, table):
    """F16 weights ``w`` (uint16 bit patterns (A3, A2, N, K), each row contiguous) times
    float32 activations ``x`` ((M, K), already rounded to F16 as ggml converts them) into
    ``out`` float32 (B3, B2, T, N), any strides: per output, sixteen float32 lanes of
    products (:func:`.simd.row_dot_f16`; the CPU must have F16C), the last ``K % 16``
    through ``table``.  Parallel by the size of the weights (as :func:`_mm_packed`, whose
    note on views in the parallel loop holds here too)."""
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
                acc = row_dot_f16(wp + j3 * ws3 + j2 * ws2 + r * ws1, xp, k)
                for i in range(k16, k):
                    acc += table[w[j3, j2, r, i]] * x[m, i]
                out[i13, i12, t, r] = acc


# ------------------------------------------------------------------------------------------
# weight rows as integer codes and per-group scales (the BLAS path)


def block_mins(rows: np.ndarray, block_bytes: int) -> np.ndarray:
    """The minimum ``m`` (f16 at bytes 2..3 of every block) of Q4_1 or Q5_1 ``rows`` (uint8
    (R, row_bytes)), as float32 (R, blocks)."""
    r, nbytes = rows.shape
    blocks = np.ascontiguousarray(rows).reshape(r, nbytes // block_bytes, block_bytes)
    return blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)


def group_size(code: int) -> int:
    """Values per scale group of the codes :func:`split_row` gives (a super-block of 256 for
    Q4_K and Q6_K, else a block of 32)."""
    return 256 if code in (Q4_K, Q6_K) else 32


@njit(cache=True, nogil=True)
def split_row(code, row, codes, scales, mins, table):
    """Packed weight ``row`` of a FAST_QUANT_TYPES ``code`` as integer codes (float32,
    ``codes`` (K,)), the scale of every group of :func:`group_size` codes (``scales``: the
    block's or super-block's ``d``) and, for Q4_1 and Q4_K, the minimum of every 32
    (``mins``: ``m``; ``dmin · min_j``), so that value ``i`` is
    ``codes[i] · scales[i // G] (- mins[i // 32] for Q4_K, + for Q4_1)``.  A k-quant's codes
    already carry their group's integer scale (``q · scale_j``, at most 63·15 for Q4_K and
    128·32 for Q6_K: exact in float32), so that one super-block is one group: ggml multiplies
    ``d`` by the integer sum of the whole super-block too."""
    rp = row.ctypes.data
    op = codes.ctypes.data
    if code == Q4_0:
        for b in range(codes.shape[0] // 32):
            decode_nibbles16_pair(rp + 18 * b + 2, 8, op + 128 * b)
            scales[b] = _f16_at(row, 18 * b, table)
    elif code == Q4_1:
        for b in range(codes.shape[0] // 32):
            decode_nibbles16_pair(rp + 20 * b + 4, 0, op + 128 * b)
            scales[b] = _f16_at(row, 20 * b, table)
            mins[b] = _f16_at(row, 20 * b + 2, table)
    elif code == Q8_0:
        for b in range(codes.shape[0] // 32):
            decode_i8_32(rp + 34 * b + 2, op + 128 * b)
            scales[b] = _f16_at(row, 34 * b, table)
    elif code == Q4_K:
        for b in range(codes.shape[0] // 256):
            o = 144 * b
            d, dmin = _f16_at(row, o, table), _f16_at(row, o + 2, table)
            for j in range(8):
                sc, mn = _k4_scale_min(row[o + 4:o + 16], j)
                first = 256 * b + 32 * j
                decode_nibbles32(rp + o + 16 + 32 * (j // 2), 4 * (j % 2), op + 4 * first)
                for i in range(first, first + 32):
                    codes[i] *= np.float32(sc)
                mins[8 * b + j] = dmin * np.float32(mn)
            scales[b] = d
    else:   # Q6_K
        for b in range(codes.shape[0] // 256):
            o = 210 * b
            d = _f16_at(row, o + 208, table)
            for n in range(2):
                ql = rp + o + 64 * n
                qh = rp + o + 128 + 32 * n
                sc = o + 192 + 8 * n
                e = op + 4 * (256 * b + 128 * n)
                first = 256 * b + 128 * n
                for h in range(2):
                    decode_q6_16(ql + 16 * h, 0, qh + 16 * h, 0, e + 64 * h)
                    decode_q6_16(ql + 32 + 16 * h, 0, qh + 16 * h, 2, e + 128 + 64 * h)
                    decode_q6_16(ql + 16 * h, 4, qh + 16 * h, 4, e + 256 + 64 * h)
                    decode_q6_16(ql + 32 + 16 * h, 4, qh + 16 * h, 6, e + 384 + 64 * h)
                    for i in range(4):      # values 16h + 32i .. +16 of this half
                        s = np.float32(np.int8(row[sc + h + 2 * i]))
                        for v in range(first + 16 * h + 32 * i, first + 16 * h + 32 * i + 16):
                            codes[v] *= s
            scales[b] = d


@sized_kernel(2, cache=True, nogil=True)
def split_rows(code, rows, codes, scales, mins, table):
    """:func:`split_row` for every row of ``rows`` (uint8 (R, row_bytes))."""
    for r in prange(rows.shape[0]):
        split_row(code, rows[r], codes[r], scales[r], mins[r], table)


@sized_kernel(3, cache=True, nogil=True)
def combine_groups(sums, a_scales, w_scales, out):
    """``out[t, n] = Σ_g (a_scales[t, g] · w_scales[g, n]) · sums[g, t, n]``, group after
    group: the exact integer sums of every group (``sums`` (G, M, R) float32) weighed by the
    product of the activation's and the weight's scale, accumulated in float32 as ggml's dot
    products accumulate their blocks (in another order)."""
    ng, m, r = sums.shape
    for t in prange(m):
        for n in range(r):
            out[t, n] = 0.0
        for g in range(ng):
            s = a_scales[t, g]
            for n in range(r):
                out[t, n] += (s * w_scales[g, n]) * sums[g, t, n]
