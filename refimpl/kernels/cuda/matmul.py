"""MUL_MAT on CUDA (spec/ops/matmul.md): ``dst[n, t] = Σ_k src0[k, n] · src1[k, t]`` with
src0 broadcast over dims 2 and 3.

One block per output element (grid-stride): its threads split K, each accumulating float32
products, and the partial sums are added in shared memory.  Weights in block formats (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) are dequantised on the fly in the
kernel; F16 weights are widened natively and BF16 through their bits.

Activations are converted as the CPU device (and ggml's CPU backend) converts them before
its dot products: for block-format weights, float activations (F32, F16, BF16) are quantised
to the weights' activation format (Q8_0, Q8_1 or Q8_K, ``VEC_DOT_TYPE``); for F16 and BF16
weights, F32 activations are rounded to that type.  The product then sees the values those
stand for, so GPU and CPU results differ by the order of float additions, not by the
activation rounding (about 1e-2 relative on a row otherwise).  One difference remains for
Q4_1 and Q5_1 weights: ggml adds their block minimum times the Q8_1 block sum that it
stores rounded to F16, the GPU times the exact sum (about 1e-4 relative).  The conversion
runs on the device (``_activations``), into a contiguous scratch copy that the product then
reads.  Activations that arrive as Q8_0/Q8_1 blocks are dequantised in the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ...protocol.ggml_types import GgmlType
from ._activations import q8_values_kernel, round_kernel
from ._common import (DEQUANT_TYPES, SMEM, block_sum, dequant, is_bf16, launch,
                      launch_rows, ld, overlaps, runner, storage, tables, targ, unravel)
from ..quants import Q8_0, Q8_1, Q8_K, VEC_DOT_TYPE

_FLOATS = (GgmlType.F32, GgmlType.F16, GgmlType.BF16)


@cuda.jit
def mm_kernel(wq, wcode, K, N, T, B2, B3, r2, r3, w, wo, ws0, ws1, ws2, ws3, wbf,
              xq, xcode, x, xo, xs0, xs1, xs2, xs3, xbf, d, do, ds0, ds1, ds2, ds3, bft, f16t):
    sh = cuda.shared.array(SMEM, np.float32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    items = N * T * B2 * B3
    for it in range(cuda.blockIdx.x, items, cuda.gridDim.x):
        n, t, i2, i3 = unravel(it, N, T, B2)
        wrow = wo + n * ws1 + (i2 // r2) * ws2 + (i3 // r3) * ws3
        xrow = xo + t * xs1 + i2 * xs2 + i3 * xs3
        acc = np.float32(0.0)
        for k in range(tid, K, nt):
            if wq:
                wv = dequant(wcode, w, wrow, k, f16t)
            else:
                wv = ld(w, wrow + k * ws0, wbf, bft)
            if xq:
                xv = dequant(xcode, x, xrow, k, f16t)
            else:
                xv = ld(x, xrow + k * xs0, xbf, bft)
            acc += wv * xv
        total = block_sum(sh, acc)
        if tid == 0:
            d[do + n * ds0 + t * ds1 + i2 * ds2 + i3 * ds3] = total


@kernel("cuda", Op.MUL_MAT)
def bind(node):
    a, b = node.src[0], node.src[1]
    wq = a.type in DEQUANT_TYPES
    if not wq and a.type not in _FLOATS:
        return None
    xq = b.type in (Q8_0, Q8_1)
    if not xq and b.type not in _FLOATS:
        return None          # Q8_K activations: not served on CUDA
    K, N = a.ne[0], a.ne[1]
    T, B2, B3 = b.ne[1], b.ne[2], b.ne[3]

    def run():
        items = node.nelements
        if not items:
            return
        f16t, bft = tables(node.buffer.memory.device)
        tw = targ(a, np.uint8 if wq else storage(a), snapshot=overlaps(node, a))
        x_bf16 = is_bf16(b)
        if (wq and not xq) or (a.type in (GgmlType.F16, GgmlType.BF16) and b.type != a.type):
            tx, x_bf16 = converted_activations(a, b, bft)
        else:
            tx = targ(b, np.uint8 if xq else storage(b), snapshot=overlaps(node, b))
        blocks, threads = launch_rows(items)
        mm_kernel[blocks, threads](wq, a.type, K, N, T, B2, B3, B2 // a.ne[2], B3 // a.ne[3],
                                   *tw, is_bf16(a), xq, b.type, *tx, x_bf16,
                                   *targ(node), bft, f16t)
    return runner(node, run)


def converted_activations(a, b, bft) -> tuple:
    """Kernel arguments ``(flat, offset, s0, s1, s2, s3)`` of a contiguous copy of ``b``'s
    values after the conversion to ``a``'s activation format that the CPU device applies
    (refimpl/kernels/matmul.py, ``_quant_activations`` and ``_float_activations``), made on
    the device (``_activations``): float32 values of the Q8 blocks for block-format weights,
    F16 or BF16 elements for F16 or BF16 weights.  Also returns whether they are BF16 bits.
    ``bft``: the device's BF16 table (``_common.tables``)."""
    K, T, B2, B3 = b.ne
    src = (*targ(b), is_bf16(b), bft)
    if a.type in DEQUANT_TYPES:
        out = cuda.device_array(b.nelements, np.float32)
        blocks, threads = launch(b.nelements // (256 if VEC_DOT_TYPE[a.type] == Q8_K else 32))
        q8_values_kernel[blocks, threads](VEC_DOT_TYPE[a.type], K, T, B2, B3, *src, out)
        out_bf16 = False
    else:
        out_bf16 = a.type == GgmlType.BF16
        out = cuda.device_array(b.nelements, np.uint16 if out_bf16 else np.float16)
        blocks, threads = launch(b.nelements)
        round_kernel[blocks, threads](K, T, B2, B3, *src, out, out_bf16)
    return (out, 0, 1, K, K * T, K * T * B2), out_bf16
