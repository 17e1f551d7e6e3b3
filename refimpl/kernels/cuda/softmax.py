"""SOFT_MAX on CUDA (spec/ops/softmax.md): one block per row; ``w = scale·x + slope·mask``,
the row maximum (with the sink) and the sum of ``exp(w - max)`` reduced in shared memory,
then ``exp(w - max) / sum``.  ALiBi slopes are ggml's (refimpl.kernels.softmax.alibi_slopes)."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ..softmax import alibi_slopes
from ._common import (SMEM, block_max, block_sum, device, launch_rows, ld, reads_safely,
                      runner, tables, targ, unravel)


@device
def _logit(x, xi, scale, use_mask, m, mi, slope, bft):
    v = x[xi] * scale
    if use_mask:
        v += slope * ld(m, mi, False, bft)
    return v


@cuda.jit
def softmax_kernel(n0, n1, n2, n3, x, xo, xs0, xs1, xs2, xs3, use_mask, m, mo, ms0, ms1, ms2,
                   ms3, mn2, mn3, use_sinks, sk, sko, sks0, slopes, scale,
                   d, do, ds0, ds1, ds2, ds3, bft):
    sh = cuda.shared.array(SMEM, np.float32)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    rows = n1 * n2 * n3
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        _, i1, i2, i3 = unravel(r * n0, n0, n1, n2)
        xb = xo + i1 * xs1 + i2 * xs2 + i3 * xs3
        mb = mo + i1 * ms1 + (i2 % mn2) * ms2 + (i3 % mn3) * ms3
        db = do + i1 * ds1 + i2 * ds2 + i3 * ds3
        slope = slopes[i2]
        mx = -math.inf
        for i0 in range(t, n0, nt):
            v = _logit(x, xb + i0 * xs0, scale, use_mask, m, mb + i0 * ms0, slope, bft)
            mx = v if v > mx else mx
        mx = block_max(sh, np.float32(mx))
        sink = np.float32(0.0)
        if use_sinks:
            sink = sk[sko + i2 * sks0]
            mx = sink if sink > mx else mx
        part = np.float32(0.0)
        for i0 in range(t, n0, nt):
            v = _logit(x, xb + i0 * xs0, scale, use_mask, m, mb + i0 * ms0, slope, bft)
            part += np.float32(math.exp(v - mx))
        total = block_sum(sh, part)
        if use_sinks:
            total += np.float32(math.exp(sink - mx))
        inv = np.float32(1.0) / total
        for i0 in range(t, n0, nt):
            v = _logit(x, xb + i0 * xs0, scale, use_mask, m, mb + i0 * ms0, slope, bft)
            d[db + i0 * ds0] = np.float32(math.exp(v - mx)) * inv


@kernel("cuda", Op.SOFT_MAX)
def bind(node):
    a = node.src[0]
    mask = node.src[1] if len(node.src) > 1 else None
    sinks = node.src[2] if len(node.src) > 2 else None
    scale = np.float32(node.param_f32(0))
    slopes_host = alibi_slopes(a.ne[2], node.param_f32(1))

    def run():
        rows = node.ne[1] * node.ne[2] * node.ne[3]
        if not rows or not node.ne[0]:
            return
        _, bft = tables(node.buffer.memory.device)
        slopes = cuda.to_device(np.ascontiguousarray(slopes_host, np.float32))
        tx = targ(a, snapshot=not reads_safely(node, a))
        if mask is not None:
            tm = targ(mask, snapshot=not reads_safely(node, mask, elementwise=False))
            mn = (mask.ne[2], mask.ne[3])
        else:
            tm, mn = tx, (1, 1)
        if sinks is not None:
            ts = targ(sinks, snapshot=not reads_safely(node, sinks, elementwise=False))[:3]
        else:
            ts = tx[:3]
        blocks, threads = launch_rows(rows)
        softmax_kernel[blocks, threads](*node.ne, *tx, mask is not None, *tm, *mn,
                                        sinks is not None, *ts, slopes, scale, *targ(node), bft)
    return runner(node, run)
