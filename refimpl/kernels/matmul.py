"""MUL_MAT: ``dst = src1 · src0ᵀ`` per batch, src0 broadcast over dims 2 and 3
(spec/ops/matmul.md).

src0 holds the weights (ne = K, N, A2, A3) and src1 the activations (K, T, B2, B3), with
``B2 % A2 == 0`` and ``B3 % A3 == 0``; dst is float32 (N, T, B2, B3) and batch (i2, i3) uses
weights (i2 // (B2/A2), i3 // (B3/A3)).

The results are bit-identical to ggml's x86 CPU backend (AVX2 + FMA, as the peer build):

* src1 is first converted to the weight type's ``vec_dot_type`` (float32, F16, BF16, Q8_0,
  Q8_1 or Q8_K; refimpl.kernels.quants quantises exactly as ggml does);
* every output is then computed with the float32 operations, in the order, that the kernel
  ggml picks for the shape would use.  :func:`ggml_path` is ggml's decision between its three
  kernels: the per-output dot products (``vec_dot``), llamafile's tiled GEMM (tinyBLAS; float
  and Q8_0-activation types from two activation rows on) and the k-quant tile kernel (k-quant
  weights from eight activation rows on).  The kernels here emulate the SIMD lanes: integer
  dot products of four consecutive values per lane, per-block scales applied with fused
  multiply-adds into eight float32 lanes, and the lanes summed in the order of ggml's
  horizontal sums.  spec/ops/matmul.md describes each path.

Fused multiply-add is LLVM's ``llvm.fma.f32`` (:func:`fma32`): one rounding, as the FMA
instructions.  Nothing here uses fastmath, so the compiler may neither fuse nor reorder the
other float operations.  Which path ggml takes never depends on its thread count, and neither
do the results (each output is computed by one thread, whole).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..graph.build import Node
from ..graph.checks import (block_rows, elementwise_strides, is_contiguous, no_src_beyond,
                            require, src, type_in)
from ..graph.ops import Op
from ..graph.registry import OpImpl, register
from .cpu_tensors import bf16_to_f32, f32_to_bf16, load_f32, rows_u8, view
from .quants import (BF16, F16, F32, K_QUANT_TYPES, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1,
                     Q5_K, Q6_K, Q8_0, QUANT_WEIGHT_TYPES, VEC_DOT_TYPE, quantize_activations,
                     table_for, unpack_activations, unpack_k_row, unpack_q32_row)

#: Types accepted as weights (src0).
WEIGHT_TYPES = frozenset({F32, F16, BF16}) | QUANT_WEIGHT_TYPES

#: ggml's kernels (see :func:`ggml_path`).
VEC_DOT, LLAMAFILE, TILED = 0, 1, 2

#: Weight rows per parallel job (each is unpacked once per job and meets every activation row).
ROW_CHUNK = 16

#: Weight types llamafile's tinyBLAS serves with Q8_0 activations on x86.
_LLAMAFILE_Q0 = frozenset({Q8_0, Q4_0, Q5_0})


# ------------------------------------------------------------------------------------------
# float helpers


@intrinsic
def fma32(typingctx, a, b, c):
    """``a * b + c`` for float32 values with a single rounding (LLVM's ``llvm.fma.f32``, the
    x86 FMA instructions' operation).  All three arguments must be float32."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        fty = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [fty], ir.FunctionType(fty, [fty] * 3))
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def hsum8(a):
    """ggml's horizontal sum of eight float32 lanes (high half plus low half, then the two
    pairs of the result, then the two halves): ``((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))``."""
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@njit(cache=True, nogil=True, inline="always")
def _hadd_reduce(acc):
    """The reduction of ggml's four 8-lane float32 accumulators (``acc`` (4, 8)) in
    vec_dot_f32/f16: lanes of 0+2 and 1+3, then of both; then high half plus low half and two
    horizontal adds: ``((t0+t1)+(t2+t3))`` with ``ti = x[i]+x[i+4]``."""
    t = np.empty(4, np.float32)
    for i in range(4):
        lo = (acc[0, i] + acc[2, i]) + (acc[1, i] + acc[3, i])
        hi = (acc[0, i + 4] + acc[2, i + 4]) + (acc[1, i + 4] + acc[3, i + 4])
        t[i] = lo + hi
    return (t[0] + t[1]) + (t[2] + t[3])


@njit(cache=True, nogil=True, inline="always")
def _bf16_reduce(acc):
    """The reduction of vec_dot_bf16's four 8-lane accumulators: ``(c0+c2) + (c1+c3)`` per
    lane, then :func:`hsum8`'s order."""
    s = np.empty(8, np.float32)
    for i in range(8):
        s[i] = (acc[0, i] + acc[2, i]) + (acc[1, i] + acc[3, i])
    return hsum8(s)


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


@njit(cache=True, nogil=True)
def _load_float_row(code, wrow, out, out_bits, table):
    """One weight row of F32 (``wrow`` uint32 bit patterns; ``out_bits`` is ``out`` seen as
    uint32) or F16/BF16 (``wrow`` uint16, widened through ``table``) into float32 ``out``."""
    if code == F32:
        for i in range(out.shape[0]):
            out_bits[i] = wrow[i]
    else:
        for i in range(out.shape[0]):
            out[i] = table[wrow[i]]


# ------------------------------------------------------------------------------------------
# float weights


@njit(cache=True, nogil=True)
def _dot_tinyblas(w, x):
    """llamafile's float GEMM for one output (K a multiple of 8): one 8-lane accumulator of
    fused multiply-adds, summed by :func:`hsum8`."""
    acc = np.zeros(8, np.float32)
    for l in range(0, w.shape[0], 8):
        for p in range(8):
            acc[p] = fma32(w[l + p], x[l + p], acc[p])
    return hsum8(acc)


@njit(cache=True, nogil=True)
def _dot_vec(code, w, x):
    """ggml_vec_dot_f32 / _f16 / _bf16 for one output: four 8-lane accumulators over the
    first ``K & ~31`` values, then the leftovers.  F32 leftovers are added in float32, the
    products rounded first for all but the last ``K % 4`` (which are fused), as the peer
    build's compiled loop does; F16/BF16 sums go on in float64 (products are exact)."""
    k = w.shape[0]
    np_ = k & ~31
    acc = np.zeros((4, 8), np.float32)
    for i in range(0, np_, 32):
        for j in range(4):
            for p in range(8):
                e = i + 8 * j + p
                acc[j, p] = fma32(w[e], x[e], acc[j, p])
    if code == BF16:
        total = np.float64(_bf16_reduce(acc))
    else:
        part = _hadd_reduce(acc)
        if code == F32:
            fused = np_ + ((k - np_) & ~3)
            for e in range(np_, fused):
                part = part + w[e] * x[e]
            for e in range(fused, k):
                part = fma32(w[e], x[e], part)
            return part
        total = np.float64(part)
    for e in range(np_, k):
        total += np.float64(w[e] * x[e])
    return np.float32(total)


@njit(parallel=True, cache=True, nogil=True)
def mm_float(code, path, w, x, out, table):
    """F32, F16 or BF16 weights ``w`` (uint32 bit patterns for F32, uint16 otherwise;
    (A3, A2, N, K)) times activations ``x`` (float32 (B3*B2*T, K): the values the products
    see) into ``out`` (float32 (B3, B2, T, N)), with ggml's ``path`` (LLAMAFILE or VEC_DOT).
    Parallel over slices of ROW_CHUNK weight rows of each batch."""
    a3, a2, n, k = w.shape
    b3, b2, nt, _ = out.shape
    r3 = b3 // a3
    r2 = b2 // a2
    nchunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
    for job in prange(b3 * b2 * nchunks):
        g, r0, r1, i13, i12, i03, i02 = _job_slice(job, nchunks, n, b2, r2, r3)
        bits = np.empty((ROW_CHUNK, k), np.uint32)
        rows = bits.view(np.float32)
        for r in range(r0, r1):
            _load_float_row(code, w[i03, i02, r], rows[r - r0], bits[r - r0], table)
        for t in range(nt):
            xr = x[g * nt + t]
            for r in range(r0, r1):
                if path == LLAMAFILE:
                    out[i13, i12, t, r] = _dot_tinyblas(rows[r - r0], xr)
                else:
                    out[i13, i12, t, r] = _dot_vec(code, rows[r - r0], xr)


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
    v = hsum8(acc)
    if code == Q4_K:
        v = v + ((accm[0] + accm[2]) + (accm[1] + accm[3]))
    elif code == Q5_K:
        v = v + summs
    return v


@njit(cache=True, nogil=True)
def _dot_k_tiled(code, wq, sc, mn, wd, wdm, aq, ad, bsums):
    """ggml's k-quant tile kernel for one output.  Per super-block: the exact integer
    ``s1 = Σ scale · (q − offset) · a`` (offset 32 for Q6_K) and, for formats with minimums,
    ``s2 = Σ min · (16-value activation sum)``; then ``r = d_w · s1`` (rounded),
    ``r = r − dmin_w · s2`` (fused) and ``acc = acc + r · d_a`` (fused), super-block after
    super-block."""
    bias = 32 if code == Q6_K else 0
    has_min = code == Q4_K or code == Q5_K or code == Q2_K
    acc = np.float32(0.0)
    for b in range(wd.shape[0]):
        s0 = 16 * b
        s1 = 0
        for g in range(16):
            o = 256 * b + 16 * g
            part = 0
            for e in range(o, o + 16):
                part += (wq[e] - bias) * np.int32(aq[e])
            s1 += sc[s0 + g] * part
        res = wd[b] * np.float32(s1)
        if has_min:
            s2 = 0
            for g in range(16):
                s2 += mn[s0 + g] * bsums[s0 + g]
            res = fma32(-wdm[b], np.float32(s2), res)
        acc = fma32(res, ad[b], acc)
    return acc


@njit(parallel=True, cache=True, nogil=True)
def mm_kquant(code, path, w, aq, ad, bsums, out, table):
    """k-quant weights ``w`` (uint8 rows (A3, A2, N, row_bytes)) times Q8_K activations
    (``aq`` int8 (B3*B2*T, K), ``ad`` float32 per 256 values, ``bsums`` int32 per 16) into
    ``out`` float32 (B3, B2, T, N), with ggml's ``path`` (TILED or VEC_DOT)."""
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
                if path == TILED:
                    v = _dot_k_tiled(code, wq[i], sc[i], mn[i], wd[i], wdm[i], aq[m], ad[m],
                                     bsums[m])
                else:
                    v = _dot_k_vec(code, wq[i], sc[i], mn[i], wd[i], wdm[i], aq[m], ad[m],
                                   bsums[m])
                out[i13, i12, t, r] = v


# ------------------------------------------------------------------------------------------
# ggml's choice of kernel


def _llamafile_takes(wtype: int, btype: int, k: int, m: int) -> bool:
    """Whether llamafile_sgemm (x86, AVX2 + F16C + FMA, no AVX-512) computes weights of
    ``wtype`` against activations already in ``btype``, for K = ``k`` and ``m`` weight rows."""
    if wtype in (F32, F16, BF16):
        return btype == wtype and k % 8 == 0 and m % 4 == 0
    return wtype in _LLAMAFILE_Q0 and btype == Q8_0


def ggml_path(wtype: int, btype: int, b_contiguous: bool, k: int, m: int, n: int) -> int:
    """The kernel ggml's CPU backend runs MUL_MAT with: weights of ``wtype`` (K = ``k``,
    ``m`` rows), ``n`` activation rows per batch (``src1.ne[1]``) of type ``btype``.

    1. k-quant weights with at least 8 activation rows: the tile kernel (TILED).
    2. From 2 activation rows on, llamafile (LLAMAFILE) if it serves the types: first tried
       on src1 as it is (only when src1 is contiguous), then, when src1 is not already in the
       weights' activation format, on the converted (contiguous) copy.
    3. Otherwise one dot product per output (VEC_DOT).
    """
    if wtype in K_QUANT_TYPES and n >= 8:
        return TILED
    if n >= 2:
        if b_contiguous and _llamafile_takes(wtype, btype, k, m):
            return LLAMAFILE
        vt = VEC_DOT_TYPE[wtype]
        if btype != vt and _llamafile_takes(wtype, vt, k, m):
            return LLAMAFILE
    return VEC_DOT


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


def round_activations(x: np.ndarray, wtype: int) -> np.ndarray:
    """float32 activations ``x`` as weights of ``wtype`` meet them in ggml's dot products:
    rounded to F16 or BF16 for such weights, as they are for F32."""
    if wtype == F32:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        if wtype == F16:
            return x.astype(np.float16).astype(np.float32)
        return bf16_to_f32(f32_to_bf16(x).reshape(x.shape))


def _float_activations(a: Node, b: Node, m: int) -> np.ndarray:
    """src1 as float32 (m, K) values in the weights' activation format (F32, or rounded to
    F16 / BF16)."""
    x = np.ascontiguousarray(load_f32(b)).reshape(m, a.ne[0])
    return x if b.type == a.type else round_activations(x, a.type)


def _quant_activations(a: Node, b: Node, m: int):
    """src1 as the weights' Q8 activation format (:class:`~.quants.Activations`)."""
    vt = VEC_DOT_TYPE[a.type]
    if b.type == vt:
        return unpack_activations(rows_u8(b).reshape(m, -1), vt, a.ne[0])
    return quantize_activations(np.ascontiguousarray(load_f32(b)).reshape(m, a.ne[0]), vt)


def _run(node: Node, a: Node, b: Node, path: int) -> None:
    """Compute the product with ggml's ``path`` into a scratch array, then store it."""
    nt, b2, b3 = b.ne[1], b.ne[2], b.ne[3]
    m = nt * b2 * b3
    out = np.zeros((b3, b2, nt, a.ne[1]), np.float32)
    if out.size and a.ne[0]:
        code = a.type
        table = table_for(code)
        if code in (F32, F16, BF16):
            x = _float_activations(a, b, m)
            w = view(a, np.uint32 if code == F32 else np.uint16)
            with np.errstate(all="ignore"):
                mm_float(code, path, w, x, out, table)
        else:
            acts = _quant_activations(a, b, m)
            w = rows_u8(a)
            if code in K_QUANT_TYPES:
                mm_kquant(code, path, w, acts.qs, acts.d, acts.bsums, out, table)
            else:
                s = acts.s if code in (Q4_1, Q5_1) else np.zeros((m, a.ne[0] // 32), np.float32)
                mm_q32(code, w, acts.qs, acts.d, s, out, table)
    view(node)[...] = out


@register
class MatMul(OpImpl):
    """MUL_MAT with F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and
    Q6_K weights."""

    ops = (Op.MUL_MAT,)

    def check(self, node: Node) -> None:
        a, b = src(node, 0, "weights"), src(node, 1, "activations")
        no_src_beyond(node, 2)
        type_in(a, WEIGHT_TYPES, node, "src0")
        type_in(b, {F32, F16, BF16, VEC_DOT_TYPE[a.type]}, node, "src1")
        require(node.type == F32, node, "dst must be f32")
        require(a.ne[0] == b.ne[0], node, f"src0 and src1 rows differ in length "
                                          f"({a.ne[0]} and {b.ne[0]})")
        require(a.ne[2] > 0 and a.ne[3] > 0, node, "src0 has an empty batch dimension")
        require(b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0, node,
                f"src0 batches {list(a.ne[2:])} do not divide src1 batches {list(b.ne[2:])}")
        expect = (a.ne[1], b.ne[1], b.ne[2], b.ne[3])
        require(node.ne == expect, node, f"dst shape must be {list(expect)}")
        block_rows(a, node, "src0")
        require(a.nb[0] <= a.nb[1], node, "src0 is transposed (nb[0] > nb[1])")
        block_rows(b, node, "src1")
        elementwise_strides(node, node, "dst")
        require(node.nelements == 0 or node.nb[0] == 4 <= node.nb[1] <= node.nb[2] <= node.nb[3],
                node, f"dst must not be transposed or permuted (nb={list(node.nb)})")

    def bind(self, node: Node, device_kind: str):
        if device_kind != "cpu":
            return None
        a, b = node.src[0], node.src[1]
        if a.type not in WEIGHT_TYPES:
            return None
        # ggml's decision, made once per node: types, shapes and src1's layout are fixed.
        btype = b.type
        if a.type not in (F32, F16, BF16) and btype in (F16, BF16):
            btype = F32      # refimpl widens these first (ggml declines them)
        path = ggml_path(a.type, btype, is_contiguous(b), a.ne[0], a.ne[1], b.ne[1])
        return lambda: _run(node, a, b, path)
