"""MUL_MAT: ``dst = src1 · src0ᵀ`` per batch, src0 broadcast over dims 2 and 3
(spec/ops/matmul.md).

src0 holds the weights (ne = K, N, A2, A3) and src1 the activations (K, T, B2, B3), with
``B2 % A2 == 0`` and ``B3 % A3 == 0``; dst is float32 (N, T, B2, B3) and batch (i2, i3) uses
weights (i2 // (B2/A2), i3 // (B3/A3)).

Numerics follow ggml's CPU backend, which first converts src1 to the weight type's
``vec_dot_type``:

* F32 weights: src1 as float32 (F16/BF16 src1 widened exactly);
* F16 / BF16 weights: src1 rounded to F16 / BF16, products summed in float32;
* block weights: src1 quantised to Q8_0, Q8_1 or Q8_K (refimpl.kernels.quants), then integer
  dot products per block with float32 scales.

F32 weights go through numpy's matmul (BLAS, float32).  F16, BF16 and block weights are
read as packed rows: for few activation rows a fused numba kernel (parallel over weight rows)
widens or dequantises each row once and takes its dot products with the activation rows;
for many rows the weights are dequantised in slices and multiplied by BLAS.  Dequantised
weights and activations are exact (scales of 11 significant bits times small integers), so
the products are ggml's and only the float32 summation order differs
(refimpl.kernels.quants explains the one exception, Q8_1's ``s``, which is kept apart).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import (block_rows, elementwise_strides, fail, no_src_beyond, require, src,
                            type_in)
from ..graph.ops import Op
from ..graph.registry import OpImpl, register
from .cpu_tensors import bf16_to_f32, f32_to_bf16, load_f32, rows_u8, view
from .quants import (BF16, F16, F32, Q4_1, Q5_1, QUANT_WEIGHT_TYPES, VEC_DOT_TYPE,
                     block_mins_row, dequantize_row, dequantize_rows_2d, dot_f32, min_dot,
                     quantize_activations, table_for, unpack_activations)

#: Types accepted as weights (src0).
WEIGHT_TYPES = frozenset({F32, F16, BF16}) | QUANT_WEIGHT_TYPES

#: Activation rows per batch up to which F16, BF16 and block weights use the fused kernel.
FUSED_MAX_ROWS = 12

#: Weight values dequantised at a time on the BLAS path (float32: 32 MiB of scratch).
DEQUANT_SLICE_VALUES = 8 << 20


# ------------------------------------------------------------------------------------------
# kernels


@njit(parallel=True, cache=True, nogil=True)
def mm_quant_fused(code, w, x, s, out, table, chunk):
    """Packed weight rows ``w`` (uint8, (A3, A2, N, row_bytes)) of type ``code`` (F16,
    BF16 or a block format) times activations ``x`` (float32 (B3*B2*T, K), the values the
    products see: dequantised Q8 or rounded halves) into ``out`` float32 (B3, B2, T, N).

    Parallel over slices of ``chunk`` weight rows; each row is dequantised once into a
    scratch vector (``table``: see :func:`refimpl.kernels.quants.dequantize_row`) and
    multiplied with the T activation rows of its batch.  For Q4_1 / Q5_1 the weight minimums
    meet the activations' ``s`` (float32 (B3*B2*T, K/32)) separately.
    """
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    k = x.shape[1]
    r3 = b3 // a3
    r2 = b2 // a2
    nchunks = (n + chunk - 1) // chunk
    has_min = code == Q4_1 or code == Q5_1
    for job in prange(b3 * b2 * nchunks):
        g = job // nchunks
        c = job - g * nchunks
        i13 = g // b2
        i12 = g - i13 * b2
        i03 = i13 // r3
        i02 = i12 // r2
        t0 = g * nt
        wrow = np.empty(k, np.float32)
        mins = np.empty(k // 32, np.float32)
        q = np.empty(256, np.int32)
        for r in range(c * chunk, min(n, (c + 1) * chunk)):
            row = w[i03, i02, r]
            dequantize_row(code, row, wrow, table, False, q)
            if has_min:
                block_mins_row(code, row, mins, table)
            for t in range(nt):
                v = dot_f32(wrow, x[t0 + t])
                if has_min:
                    v += min_dot(mins, s[t0 + t])
                out[i13, i12, t, r] = v


def mm_quant_blas(code: int, w: np.ndarray, x: np.ndarray, s: np.ndarray,
                  out: np.ndarray) -> None:
    """The many-rows path, with the arguments of :func:`mm_quant_fused`: weights
    dequantised a slice of rows at a time (about DEQUANT_SLICE_VALUES values) into one
    scratch matrix and multiplied with the activations by BLAS.  Q4_1 / Q5_1 minimums meet
    the activations' ``s`` as ggml does."""
    a3, a2, n, _ = w.shape
    b3, b2, nt, _ = out.shape
    k = x.shape[1]
    r3, r2 = b3 // a3, b2 // a2
    x = x.reshape(b3, b2, nt, k)
    table = table_for(code)
    has_min = code in (Q4_1, Q5_1)
    if has_min:
        s = s.reshape(b3, b2, nt, -1)
    step = max(1, min(n, DEQUANT_SLICE_VALUES // max(k, 1)))
    scratch = np.empty((step, k), np.float32)
    mins = np.empty((step, k // 32), np.float32)
    for i03 in range(a3):
        for i02 in range(a2):
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                wf, mf = scratch[:r1 - r0], mins[:r1 - r0]
                dequantize_rows_2d(code, w[i03, i02, r0:r1], wf, table, False)
                if has_min:
                    block_mins_2d(code, w[i03, i02, r0:r1], mf, table)
                for i13 in range(i03 * r3, (i03 + 1) * r3):
                    for i12 in range(i02 * r2, (i02 + 1) * r2):
                        with np.errstate(all="ignore"):
                            part = x[i13, i12] @ wf.T
                            if has_min:
                                part += s[i13, i12] @ mf.T
                        out[i13, i12, :, r0:r1] = part


@njit(cache=True, nogil=True)
def block_mins_2d(code, rows, out, table):
    """:func:`block_mins_row` for every row of ``rows``."""
    for r in range(rows.shape[0]):
        block_mins_row(code, rows[r], out[r], table)


def _batched_float(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float32 weights (A3, A2, N, K) and activations (B3, B2, T, K) -> (B3, B2, T, N)."""
    a3, a2, n, k = w.shape
    b3, b2, nt, _ = x.shape
    x6 = x.reshape(a3, b3 // a3, a2, b2 // a2, nt, k)
    w6 = w[:, None, :, None]
    out = np.matmul(x6, np.swapaxes(w6, -1, -2))
    return out.reshape(b3, b2, nt, n)


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


def _run_float(node: Node, a: Node, b: Node) -> None:
    """F32 weights: numpy's matmul (BLAS) on float32, F16/BF16 activations widened."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = _batched_float(view(a), load_f32(b))
    view(node)[...] = out


def _activations(a: Node, b: Node, m: int):
    """src1 as the weights' activation format: float32 (m, K) values the products see, and
    Q8_1's ``s`` (m, K/32) for Q4_1/Q5_1 weights (else an empty array)."""
    code, k = a.type, a.ne[0]
    vt = VEC_DOT_TYPE[code]
    if code in (F16, BF16):
        x = np.ascontiguousarray(load_f32(b)).reshape(m, k)
        if b.type != code:
            with np.errstate(over="ignore", invalid="ignore"):
                if code == F16:
                    x = x.astype(np.float16).astype(np.float32)
                else:
                    x = bf16_to_f32(f32_to_bf16(x).reshape(x.shape))
        return x, np.zeros((m, 0), np.float32)
    if b.type == vt:
        acts = unpack_activations(rows_u8(b).reshape(m, -1), vt, k)
    else:
        acts = quantize_activations(np.ascontiguousarray(load_f32(b)).reshape(m, k), vt)
    s = acts.s if code in (Q4_1, Q5_1) else np.zeros((m, 0), np.float32)
    return acts.dequantized(), s


def _run_rows(node: Node, a: Node, b: Node) -> None:
    """F16, BF16 and block weights: read as packed rows, widened or dequantised in kernels."""
    nt, b2, b3 = b.ne[1], b.ne[2], b.ne[3]
    m = nt * b2 * b3
    out = np.zeros((b3, b2, nt, a.ne[1]), np.float32)
    if out.size and a.ne[0]:
        x, s = _activations(a, b, m)
        w = rows_u8(a)
        if nt <= FUSED_MAX_ROWS:
            chunk = max(1, min(16, a.ne[1] // 8))
            mm_quant_fused(a.type, w, x, s, out, table_for(a.type), chunk)
        else:
            mm_quant_blas(a.type, w, x, s, out)
    view(node)[...] = out


@register
class MatMul(OpImpl):
    """MUL_MAT with F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K weights."""

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
        if a.type == F32:
            return lambda: _run_float(node, a, b)
        if a.type in (F16, BF16) or a.type in QUANT_WEIGHT_TYPES:
            return lambda: _run_rows(node, a, b)
        return None
