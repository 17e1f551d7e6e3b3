"""RMS_NORM and NORM on CUDA (spec/ops/norm.md): one block per row, float32 sums reduced
across the block's threads in shared memory."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ._common import SMEM, block_sum, launch_rows, reads_safely, runner, targ, unravel


@cuda.jit
def norm_kernel(rms, eps, n0, n1, n2, n3, x, xo, xs0, xs1, xs2, xs3, d, do, ds0, ds1, ds2, ds3):
    sh = cuda.shared.array(SMEM, np.float32)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    rows = n1 * n2 * n3
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        _, i1, i2, i3 = unravel(r * n0, n0, n1, n2)
        xb = xo + i1 * xs1 + i2 * xs2 + i3 * xs3
        db = do + i1 * ds1 + i2 * ds2 + i3 * ds3
        mean = np.float32(0.0)
        if not rms:
            part = np.float32(0.0)
            for i0 in range(t, n0, nt):
                part += x[xb + i0 * xs0]
            mean = block_sum(sh, part) / np.float32(n0)
        part = np.float32(0.0)
        for i0 in range(t, n0, nt):
            v = x[xb + i0 * xs0] - mean
            part += v * v
        var = block_sum(sh, part) / np.float32(n0)
        scale = np.float32(1.0) / np.float32(math.sqrt(var + eps))
        for i0 in range(t, n0, nt):
            d[db + i0 * ds0] = (x[xb + i0 * xs0] - mean) * scale


@kernel("cuda", Op.RMS_NORM, Op.NORM)
def bind(node):
    a = node.src[0]
    eps = np.float32(node.param_f32(0))
    rms = node.op == Op.RMS_NORM

    def run():
        rows = node.ne[1] * node.ne[2] * node.ne[3]
        if not rows or not node.ne[0]:
            return
        # each row is read whole before it is written, by one block: in place is safe
        ta = targ(a, snapshot=not reads_safely(node, a))
        blocks, threads = launch_rows(rows)
        norm_kernel[blocks, threads](rms, eps, *node.ne, *ta, *targ(node))
    return runner(node, run)
