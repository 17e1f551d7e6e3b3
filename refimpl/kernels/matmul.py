"""MUL_MAT: ``dst = src1 · src0ᵀ`` per batch, src0 broadcast over dims 2 and 3
(spec/ops/matmul.md).

src0 holds the weights (ne = K, N, A2, A3) and src1 the activations (K, T, B2, B3), with
``B2 % A2 == 0`` and ``B3 % A3 == 0``; dst is float32 (N, T, B2, B3) and batch (i2, i3) uses
weights (i2 // (B2/A2), i3 // (B3/A3)).

src1 is first converted as ggml converts it: to the weight type's ``vec_dot_type`` (Q8_0,
Q8_1 or Q8_K, quantised exactly as ggml does by refimpl.kernels.quants), or rounded to F16 /
BF16 for such weights.  The products themselves follow the numerics contract
(spec/numerics.md): test-backend-ops' bound, not ggml's order of operations.  Which kernel
computes them is decided once, when the node is bound (:func:`choose_kernel`):

* ``PACKED``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights, whatever the number
  of activation rows: integer dot products on the packed blocks, four activation rows at a
  time where there are four; F32 and F16 weights with fewer than :data:`BLAS_MIN_ROWS`
  activation rows in sixteen float32 lanes a row, F16 widened by the CPU (F16C)
  (refimpl.kernels.matmul_fast; numpy's matmul had run a one-token F32 product on one
  thread).  (Prompts once took BLAS on integer codes split out of the weights: as fast at
  one thread, but it ran at half ggml's speed at two, where the packed products keep ~0.8;
  bench/README.md.)
* ``BLAS``: F32, F16 and BF16 weights otherwise, and the other block formats from
  :data:`BLAS_MIN_ROWS` activation rows on, through numpy's ``matmul`` (sgemm): float weights
  widened exactly, block formats dequantised exactly, activations too (:func:`_blas`);
* ``UNPACKED``: the other block formats (Q2_K, Q3_K) with few activation rows: each
  weight row unpacked to integers, then ggml's x86 dot products lane by lane (the
  kernels below; integer sums of four products per lane, scales applied with fused
  multiply-adds into eight float32 lanes);
* ``DEQUANT``: the formats of refimpl.kernels.quants_more (IQ4_NL, IQ4_XS, MXFP4, NVFP4,
  TQ1_0, TQ2_0, Q1_0, Q2_0) with few activation rows: each weight row dequantised once
  (exact) and dotted in float32 with the exact values of the Q8_0 / Q8_K activations
  (:func:`.quants_more.mm_dequant`); from BLAS_MIN_ROWS rows on they take ``BLAS`` like
  Q5_0 (decoded tiles, sgemm);
* ``GRID``: the codebook formats of refimpl.kernels.quants_grid (IQ1_S, IQ1_M, IQ2_XXS,
  IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), whatever the number of activation rows (ggml has no other
  kernel for them): ggml's arithmetic, an exact integer sum per super-block scaled by
  ``d_w·d_a`` (:func:`.quants_grid.mm_grid`).

No result depends on the thread count (each output is computed by one thread, whole).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.matmul import WEIGHT_TYPES
from . import matmul_fast as fast
from .cpu_tensors import bf16_to_f32, f16_to_f32, load_f32, round_to, rows_u8, view
from .numeric import fma32, hsum8_f32
from . import quants_grid, quants_more
from .set_rows import check_indices
from .quants import (BF16, F16, F16_TABLE, F32, K_QUANT_TYPES, MORE_WEIGHT_TYPES, Q2_K, Q4_0,
                     Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Q8_1, Q8_K, VEC_DOT_TYPE,
                     dequantize_rows, quantize_activations, quantize_q8_32, quantize_q8_k,
                     table_for, unpack_activations, unpack_k_row, unpack_q32_row)
from .simd import HAS_F16C

#: Types accepted as weights (src0).

#: The kernels (see :func:`choose_kernel`).
BLAS, PACKED, UNPACKED, DEQUANT, GRID = "blas", "packed", "unpacked", "dequant", "grid"

#: Weights without a packed product meet this many activation rows per batch or more through
#: BLAS.
BLAS_MIN_ROWS = 4

#: Weight rows decoded to float32 at a time on the BLAS path (bounds its scratch memory).
BLAS_TILE_ROWS = 4096

#: Weight rows per parallel job (each is unpacked once per job and meets every activation row).
ROW_CHUNK = 16


# ------------------------------------------------------------------------------------------
# helpers


@njit(cache=True, nogil=True, inline="always")
def _job_slice(job, nchunks, n, b2, r2, r3):
    """The work of parallel job ``job`` of a matmul kernel: weight rows ``r0:r1`` (a slice of
    ROW_CHUNK rows), for activation batch ``g`` = (i13, i12), whose weights are batch
    (i03, i02) (broadcast by the ratios r3, r2)."""
    g = job // nchunks
    r0 = (job - g * nchunks) * ROW_CHUNK
    r1 = min(n, r0 + ROW_CHUNK)
    i13 = g // b2
    i12 = g - i13 * b2
    return g, r0, r1, i13, i12, i13 // r3, i12 // r2


# ------------------------------------------------------------------------------------------
# 32-value block weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)


@njit(cache=True, nogil=True, inline="always")
def _lane4(wq, aq, o, sign_trick):
    """The integer sum of the four products ``wq[o:o+4] · aq[o:o+4]``; with ``sign_trick``,
    an activation of -128 multiplies ``|w|`` (x86's sign trick, see :func:`_dot_q32`)."""
    w0, w1, w2, w3 = wq[o], wq[o + 1], wq[o + 2], wq[o + 3]
    x0, x1, x2, x3 = np.int32(aq[o]), np.int32(aq[o + 1]), np.int32(aq[o + 2]), np.int32(aq[o + 3])
    if sign_trick:
        if x0 == -128:
            w0 = abs(w0)
        if x1 == -128:
            w1 = abs(w1)
        if x2 == -128:
            w2 = abs(w2)
        if x3 == -128:
            w3 = abs(w3)
    return (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)


@njit(cache=True, nogil=True)
def _dot_q32(sign_trick, has_min, wq, wd, wm, aq, ad, asum):
    """One output of a 32-value block format against Q8_0/Q8_1 activations (``aq`` int8
    values, ``ad`` scales, ``asum`` Q8_1's ``s``): per block, eight lanes of four integer
    products, each lane scaled by ``d_w * d_a`` into its accumulator with a fused
    multiply-add; Q4_1/Q5_1 add ``m * s`` per block into a separate fused sum.

    Q4_0, Q5_0 and Q8_0 multiply through x86's sign trick (|w| times the activation with
    w's sign), which gives ``-128 * |w|`` for an activation of -128 whatever w's sign;
    ``sign_trick`` asks for that (only needed when the activation row holds a -128)."""
    z = np.float32(0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z
    summs = z
    for b in range(wd.shape[0]):
        dd = wd[b] * ad[b]
        o = 32 * b
        a0 = fma32(dd, np.float32(_lane4(wq, aq, o, sign_trick)), a0)
        a1 = fma32(dd, np.float32(_lane4(wq, aq, o + 4, sign_trick)), a1)
        a2 = fma32(dd, np.float32(_lane4(wq, aq, o + 8, sign_trick)), a2)
        a3 = fma32(dd, np.float32(_lane4(wq, aq, o + 12, sign_trick)), a3)
        a4 = fma32(dd, np.float32(_lane4(wq, aq, o + 16, sign_trick)), a4)
        a5 = fma32(dd, np.float32(_lane4(wq, aq, o + 20, sign_trick)), a5)
        a6 = fma32(dd, np.float32(_lane4(wq, aq, o + 24, sign_trick)), a6)
        a7 = fma32(dd, np.float32(_lane4(wq, aq, o + 28, sign_trick)), a7)
        if has_min:
            summs = fma32(wm[b], asum[b], summs)
    v = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    if has_min:
        v = v + summs
    return v


@njit(parallel=True, cache=True, nogil=True)
def mm_q32(code, w, aq, ad, asum, out, table):
    """Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 weights ``w`` (uint8 rows (A3, A2, N, row_bytes))
    times Q8_0/Q8_1 activations (``aq`` int8 (B3*B2*T, K), ``ad`` and Q8_1's ``asum`` float32
    per block) into ``out`` float32 (B3, B2, T, N).  ggml's dot products and llamafile's
    GEMM compute these identically."""
    trick = np.zeros(aq.shape[0], np.bool_)
    if code == Q4_0 or code == Q5_0 or code == Q8_0:
        for m in prange(aq.shape[0]):
            for e in range(aq.shape[1]):
                if aq[m, e] == -128:
                    trick[m] = True
                    break
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    k = aq.shape[1]
    nb = k // 32
    r3 = b3 // a3
    r2 = b2 // a2
    has_min = code == Q4_1 or code == Q5_1
    nchunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
    for job in prange(b3 * b2 * nchunks):
        g, r0, r1, i13, i12, i03, i02 = _job_slice(job, nchunks, n, b2, r2, r3)
        wq = np.empty((ROW_CHUNK, k), np.int32)
        wd = np.empty((ROW_CHUNK, nb), np.float32)
        wm = np.zeros((ROW_CHUNK, nb), np.float32)
        for r in range(r0, r1):
            unpack_q32_row(code, w[i03, i02, r], wq[r - r0], wd[r - r0], wm[r - r0], table)
        for t in range(nt):
            m = g * nt + t
            for r in range(r0, r1):
                out[i13, i12, t, r] = _dot_q32(trick[m], has_min, wq[r - r0], wd[r - r0],
                                               wm[r - r0], aq[m], ad[m], asum[m])


# ------------------------------------------------------------------------------------------
# k-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)


@njit(cache=True, nogil=True)
def _dot_k_vec(code, wq, sc, mn, wd, wdm, aq, ad, bsums):
    """ggml_vec_dot_<k-quant>_q8_K for one output.  Per super-block: eight integer lanes,
    lane ``p`` summing (scale of the values) x (four products) over values ``4p..4p+3`` of
    every 32; then ``d = d_a * d_w`` scales them into eight float32 lanes with fused
    multiply-adds.  The minimums (``dmin = -d_a * dmin_w`` times the activations' 16-value
    sums) go into four separate lanes for Q4_K, one float32 sum for Q5_K and the same eight
    lanes (before the scales) for Q2_K; Q6_K subtracts its offset of 32 per lane."""
    acc = np.zeros(8, np.float32)
    accm = np.zeros(4, np.float32)
    summs = np.float32(0.0)
    lanes = np.empty(8, np.int64)
    for b in range(wd.shape[0]):
        s0 = 16 * b
        d = ad[b] * wd[b]
        dmin = -ad[b] * wdm[b]
        for p in range(8):
            lanes[p] = 0
        for c in range(8):
            for p in range(8):
                o = 256 * b + 32 * c + 4 * p
                part = 0
                for e in range(o, o + 4):
                    part += wq[e] * np.int32(aq[e])
                lanes[p] += sc[s0 + 2 * c + p // 4] * part
        if code == Q4_K:
            for t in range(4):
                prod = (mn[s0 + 4 * t] * (bsums[s0 + 4 * t] + bsums[s0 + 4 * t + 1])
                        + mn[s0 + 4 * t + 2] * (bsums[s0 + 4 * t + 2] + bsums[s0 + 4 * t + 3]))
                accm[t] = fma32(dmin, np.float32(prod), accm[t])
        elif code == Q5_K:
            total = 0
            for g in range(8):
                total += mn[s0 + 2 * g] * (bsums[s0 + 2 * g] + bsums[s0 + 2 * g + 1])
            summs = fma32(dmin, np.float32(total), summs)
        elif code == Q2_K:
            for p in range(8):
                prod = mn[s0 + 2 * p] * bsums[s0 + 2 * p] + mn[s0 + 2 * p + 1] * bsums[s0 + 2 * p + 1]
                acc[p] = fma32(dmin, np.float32(prod), acc[p])
        elif code == Q6_K:
            for p in range(8):
                lanes[p] -= 32 * (bsums[s0 + 2 * p] * sc[s0 + 2 * p]
                                  + bsums[s0 + 2 * p + 1] * sc[s0 + 2 * p + 1])
        for p in range(8):
            acc[p] = fma32(d, np.float32(lanes[p]), acc[p])
    v = hsum8_f32(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])
    if code == Q4_K:
        v = v + ((accm[0] + accm[2]) + (accm[1] + accm[3]))
    elif code == Q5_K:
        v = v + summs
    return v


@njit(parallel=True, cache=True, nogil=True)
def mm_kquant(code, w, aq, ad, bsums, out, table):
    """k-quant weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) times Q8_K activations
    (``aq`` int8 (B3*B2*T, K), ``ad`` float32 per 256 values, ``bsums`` int32 per 16) into
    ``out`` float32 (B3, B2, T, N), with ggml's ``vec_dot`` arithmetic."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    k = aq.shape[1]
    nb = k // 256
    r3 = b3 // a3
    r2 = b2 // a2
    nchunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
    for job in prange(b3 * b2 * nchunks):
        g, r0, r1, i13, i12, i03, i02 = _job_slice(job, nchunks, n, b2, r2, r3)
        wq = np.empty((ROW_CHUNK, k), np.int32)
        sc = np.empty((ROW_CHUNK, k // 16), np.int32)
        mn = np.empty((ROW_CHUNK, k // 16), np.int32)
        wd = np.empty((ROW_CHUNK, nb), np.float32)
        wdm = np.empty((ROW_CHUNK, nb), np.float32)
        for r in range(r0, r1):
            i = r - r0
            unpack_k_row(code, w[i03, i02, r], wq[i], sc[i], mn[i], wd[i], wdm[i], table)
        for t in range(nt):
            m = g * nt + t
            for r in range(r0, r1):
                i = r - r0
                out[i13, i12, t, r] = _dot_k_vec(code, wq[i], sc[i], mn[i], wd[i], wdm[i],
                                                 aq[m], ad[m], bsums[m])


# ------------------------------------------------------------------------------------------
# numpy oracle


def reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Numpy oracle: ``w`` (A3, A2, N, K) and ``x`` (B3, B2, T, K), both already holding the
    values the product sees (dequantised weights, activations after conversion), multiplied
    in float64 with src0's batch broadcast.  Returns float64 (B3, B2, T, N)."""
    a3, a2 = w.shape[:2]
    b3, b2 = x.shape[:2]
    wb = np.repeat(np.repeat(w.astype(np.float64), b3 // a3, axis=0), b2 // a2, axis=1)
    return np.einsum("abnk,abtk->abtn", wb, x.astype(np.float64))


# ------------------------------------------------------------------------------------------
# the op


def _float_activations(a: Node, b: Node, m: int) -> np.ndarray:
    """src1 as C-ordered float32 (m, K) values in float weights' activation format (F32, or
    rounded to F16 / BF16)."""
    x = np.ascontiguousarray(load_f32(b)).reshape(m, a.ne[0])
    return x if b.type == a.type else round_to(x, a.type)


def _quant_activations(a: Node, b: Node, m: int):
    """src1 as the weights' Q8 activation format (:class:`~.quants.Activations`)."""
    vt = VEC_DOT_TYPE[a.type]
    if b.type == vt:
        return unpack_activations(rows_u8(b).reshape(m, -1), vt, a.ne[0])
    return quantize_activations(np.ascontiguousarray(load_f32(b)).reshape(m, a.ne[0]), vt)


def choose_kernel(wtype: int, rows: int) -> str:
    """The kernel for weights of ``wtype`` meeting ``rows`` activation rows per batch (F32
    and F16 weights take the packed kernel below :data:`BLAS_MIN_ROWS` rows, F16 only on a
    CPU that converts half precision itself)."""
    if rows < BLAS_MIN_ROWS and (wtype == F32 or (wtype == F16 and HAS_F16C)):
        return PACKED
    if wtype in quants_grid.GRID_TYPES:
        return GRID
    if wtype in fast.PACKED_TYPES:
        return PACKED
    if wtype in (F32, F16, BF16) or rows >= BLAS_MIN_ROWS:
        return BLAS
    if wtype in MORE_WEIGHT_TYPES:
        return DEQUANT
    return UNPACKED


def _weight_rows(a: Node, r0: int, r1: int) -> np.ndarray:
    """Packed weight rows ``r0:r1`` of every batch, contiguous: uint8 (A3*A2*(r1-r0), bytes)."""
    rows = rows_u8(a)[:, :, r0:r1]
    return np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])


def _float_weights(a: Node, r0: int, r1: int) -> np.ndarray:
    """Weight rows ``r0:r1`` of every batch as float32 (A3, A2, r1-r0, K); the minimum of
    Q4_1 and Q5_1 is left out (:func:`_blas` adds it as ggml does)."""
    if a.type == F32:
        return view(a)[:, :, r0:r1]
    if a.type == F16:
        return f16_to_f32(view(a)[:, :, r0:r1])
    if a.type == BF16:
        return bf16_to_f32(view(a, np.uint16)[:, :, r0:r1])
    out = dequantize_rows(a.type, _weight_rows(a, r0, r1), a.ne[0],
                          with_min=a.type not in (Q4_1, Q5_1))
    return out.reshape(a.ne[3], a.ne[2], r1 - r0, a.ne[0])


def _blas(a: Node, x: np.ndarray, sums, out: np.ndarray) -> None:
    """The product through numpy's matmul: float32 activations ``x`` (M, K) as the products
    see them, weights decoded BLAS_TILE_ROWS rows at a time.  For Q4_1 and Q5_1 weights,
    ``sums`` holds the activations' stored block sums ``s`` (M, K/32), and ``m_w · s_a`` is
    added per block as ggml's dot products add it, through a second, small product."""
    b3, b2, nt, n = out.shape
    a3, a2, k = a.ne[3], a.ne[2], a.ne[0]
    # batch i13 = i03 * r3 + j uses weights i03: split B3 into (A3, r3) and B2 likewise
    xs = x.reshape(a3, b3 // a3, a2, b2 // a2, nt, k)
    res = out.reshape(a3, b3 // a3, a2, b2 // a2, nt, n)
    if sums is not None:
        sums = sums.reshape(a3, b3 // a3, a2, b2 // a2, nt, k // 32)
    with np.errstate(all="ignore"):
        for r0 in range(0, n, BLAS_TILE_ROWS):
            r1 = min(n, r0 + BLAS_TILE_ROWS)
            w = _float_weights(a, r0, r1)[:, None, :, None]
            part = np.matmul(xs, w.swapaxes(-1, -2))
            if sums is not None:
                mins = fast.block_mins(_weight_rows(a, r0, r1), 20 if a.type == Q4_1 else 24)
                part += np.matmul(sums, mins.reshape(a3, 1, a2, 1, r1 - r0, k // 32)
                                  .swapaxes(-1, -2))
            res[..., r0:r1] = part


def _integer(a: Node, acts, kernel: str, out: np.ndarray) -> None:
    """The product with the integer kernels, on packed rows (PACKED) or unpacked ones."""
    code, m = a.type, acts.qs.shape[0]
    w = rows_u8(a)
    s = acts.s if code in (Q4_1, Q5_1) else np.zeros((m, a.ne[0] // 32), np.float32)
    if kernel == PACKED:
        bsums = acts.bsums if code in K_QUANT_TYPES else np.zeros((m, 1), np.int32)
        fast.mm_packed(code, w, acts.qs, acts.d, s, bsums, out, table_for(code))
    elif code in K_QUANT_TYPES:
        mm_kquant(code, w, acts.qs, acts.d, acts.bsums, out, table_for(code))
    else:
        mm_q32(code, w, acts.qs, acts.d, s, out, table_for(code))


#: Weight types whose x86 dot products multiply an activation of -128 as -128·|w| (the sign
#: trick, see :func:`_dot_q32`); only the unpacked kernels reproduce it.
_SIGN_TRICK_TYPES = frozenset({Q4_0, Q5_0, Q8_0})


def _needs_sign_trick(wtype: int, qs: np.ndarray) -> bool:
    """Whether these Q8_0 activations (int8 codes) meet weights of ``wtype`` with a -128,
    which only NaN activations or a src1 arriving quantised produce."""
    return wtype in _SIGN_TRICK_TYPES and qs.size > 0 and qs.min() == -128


def _mm_float(a: Node, x: np.ndarray, out: np.ndarray) -> None:
    """The PACKED product of F16 or F32 weights ``a`` with float32 activations ``x`` (M, K),
    already in the weights' precision, into ``out`` (B3, B2, T, N)."""
    if a.type == F16:
        fast.mm_f16(view(a, np.uint16), x, out, F16_TABLE)
    else:
        fast.mm_f32(view(a), x, out, None)


def _run(node: Node, a: Node, b: Node, kernel: str) -> None:
    """Compute the product with ``kernel`` into a scratch array, then store it."""
    nt, b2, b3 = b.ne[1], b.ne[2], b.ne[3]
    m = nt * b2 * b3
    if kernel == PACKED and a.type in (F16, F32):
        if node.nelements:
            _mm_float(a, _float_activations(a, b, m), view(node))
        return
    out = np.zeros((b3, b2, nt, a.ne[1]), np.float32)
    if out.size and a.ne[0]:
        _compute(a, lambda: _float_activations(a, b, m), lambda: _quant_activations(a, b, m),
                 kernel, out)
    view(node)[...] = out


def _compute(a: Node, float_acts, quant_acts, kernel: str, out: np.ndarray) -> None:
    """``out`` (B3, B2, T, N) = the product of weights ``a`` with the activations that
    ``float_acts()`` (float weights: float32 (M, K) in the weights' precision) or
    ``quant_acts()`` (quantised weights: :class:`~.quants.Activations`) make."""
    if a.type in (F32, F16, BF16):
        _blas(a, float_acts(), None, out)
        return
    acts = quant_acts()
    if _needs_sign_trick(a.type, acts.qs):
        kernel = UNPACKED
    if kernel == GRID:
        quants_grid.matmul(a.type, rows_u8(a), acts.qs, acts.d, out)
    elif kernel == DEQUANT:
        quants_more.matmul_few_rows(a.type, rows_u8(a),
                                    acts.dequantized().reshape(*out.shape[:3], -1), out)
    elif kernel == BLAS:
        _blas(a, acts.dequantized(), acts.s if a.type in (Q4_1, Q5_1) else None, out)
    else:
        _integer(a, acts, kernel, out)


def product(a: Node, x: np.ndarray) -> np.ndarray:
    """Weights ``a`` (one matrix: ne[2] = ne[3] = 1) times float32 activation rows ``x``
    (M, K, C order), computed as MUL_MAT computes it: activations converted to the weights'
    format, the kernel chosen for M rows.  Returns float32 (M, N)."""
    m = x.shape[0]
    kernel = choose_kernel(a.type, m)
    out = np.zeros((1, 1, m, a.ne[1]), np.float32)
    if out.size and a.ne[0]:
        if kernel == PACKED and a.type in (F16, F32):
            _mm_float(a, round_to(x, a.type), out)
        else:
            _compute(a, lambda: round_to(x, a.type),
                     lambda: quantize_activations(x, VEC_DOT_TYPE[a.type]), kernel, out)
    return out[0, 0]


class _BoundPacked:
    """The PACKED product of one node, bound once (issue 12's "bind once, run many"): views,
    activation buffers and the kernel's arguments are made when the graph is bound, so that
    a GRAPH_RECOMPUTE of a one-token step only quantises src1 and calls the kernel, which
    writes straight into dst.  Applies to float src1 (the weights' activation format is then
    refimpl's to make); anything unusual takes :func:`_run`."""

    def __init__(self, node: Node, a: Node, b: Node):
        self.node, self.a, self.b = node, a, b
        k, m = a.ne[0], b.ne[1] * b.ne[2] * b.ne[3]
        vt = VEC_DOT_TYPE[a.type]
        per = 256 if vt == Q8_K else 32
        self.vt = vt
        self.qs = np.empty((m, k), np.int8)
        self.d = np.empty((m, k // per), np.float32)
        self.s = np.zeros((m, k // 32), np.float32)
        self.bsums = np.zeros((m, k // 16 if vt == Q8_K else 1), np.int32)
        self.args = (a.type, rows_u8(a), self.qs, self.d, self.s, self.bsums, view(node),
                     table_for(a.type))
        self.m, self.k = m, k

    def __call__(self) -> None:
        x = load_f32(self.b)
        x = x.reshape(self.m, self.k) if x.flags.c_contiguous else \
            np.ascontiguousarray(x).reshape(self.m, self.k)
        if self.vt == Q8_K:
            quantize_q8_k(x, self.qs, self.d, self.bsums)
            lowest = 0                       # (no sign trick for the k-quants)
        else:
            lowest = quantize_q8_32(x, self.qs, self.d, self.s, self.vt == Q8_1)
        if lowest and self.a.type in _SIGN_TRICK_TYPES:    # _needs_sign_trick, counted
            _run(self.node, self.a, self.b, UNPACKED)
            return
        fast.mm_packed(*self.args)


@kernel("cpu", Op.MUL_MAT)
def bind_mat_mul(node: Node):
    """MUL_MAT with F32, F16, BF16 and every type of QUANT_WEIGHT_TYPES as weights: the CPU
    runner of a validated node."""
    a, b = node.src[0], node.src[1]
    if a.type not in WEIGHT_TYPES:
        return None
    kernel = choose_kernel(a.type, b.ne[1])    # types and shapes are fixed: once per node
    if (kernel == PACKED and a.type in fast.PACKED_TYPES and b.type in (F32, F16, BF16)
            and node.nelements and a.ne[0]):
        return _BoundPacked(node, a, b)
    return lambda: _run(node, a, b, kernel)


# ------------------------------------------------------------------------------------------
# MUL_MAT_ID


def reference_id(w: np.ndarray, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Numpy oracle of MUL_MAT_ID: experts ``w`` (E, N, K) as the product sees them,
    activations ``x`` (T, B1, K), ids (T, U); returns float64 (T, U, N) with
    ``out[t, j] = w[ids[t, j]] · x[t, j % B1]``."""
    t, u = ids.shape
    xs = np.asarray(x, np.float64)[np.arange(t)[:, None], np.arange(u)[None, :] % x.shape[1]]
    return np.einsum("tunk,tuk->tun", np.asarray(w, np.float64)[ids], xs)


def expert_matrix(a: Node, e: int) -> Node:
    """Expert ``e`` of the weights ``a`` (K, N, n_expert) as a node of its own: one matrix
    (K, N, 1, 1) at the offset of its bytes, with views of its own."""
    n, nb = a.ne[1], a.nb
    row = a.ne[0] // a.traits.block_size * a.traits.type_size
    return dataclasses.replace(a, ne=(a.ne[0], n, 1, 1), nb=(nb[0], nb[1], nb[1] * n, nb[1] * n),
                               offset=a.offset + e * nb[2],
                               nbytes=(n - 1) * nb[1] + row if n else 0, views={})


@kernel("cpu", Op.MUL_MAT_ID)
def bind_mat_mul_id(node: Node):
    """MUL_MAT_ID: the CPU runner of a validated node.  Every expert id is checked before
    anything is written (an id outside [0, n_expert) makes ggml's CPU backend write outside
    its scratch memory); then the activation rows routed to each expert are gathered and
    multiplied by MUL_MAT's own kernels (:func:`product`), and scattered into dst."""
    a, b, ids = node.src[0], node.src[1], node.src[2]
    if a.type not in WEIGHT_TYPES:
        return None
    n_expert, n_used, n_tokens = a.ne[2], ids.ne[0], ids.ne[1]
    if node.nelements == 0:
        return lambda: None
    experts = [expert_matrix(a, e) for e in range(n_expert)]
    ids_v, x_v, out = view(ids), view(b)[0], view(node)[0]
    # slot (t, j) reads activation row (t, j % b.ne[1])
    tok = np.repeat(np.arange(n_tokens), n_used)
    col = np.tile(np.arange(n_used), n_tokens)
    xcol = col % b.ne[1]

    def run():
        check_indices(node, ids_v, n_expert, "expert id", 2)
        chosen = ids_v[0, 0].ravel()                       # slot t * n_used + j
        order = np.argsort(chosen, kind="stable")
        counts = np.bincount(chosen, minlength=n_expert)
        start = 0
        results = []
        for e in np.flatnonzero(counts):
            slots = order[start:start + counts[e]]
            start += counts[e]
            x = np.ascontiguousarray(x_v[tok[slots], xcol[slots]])
            results.append((slots, product(experts[e], x)))
        # written only after every product: dst may share bytes with src1
        for slots, res in results:
            out[tok[slots], col[slots]] = res
    return run
