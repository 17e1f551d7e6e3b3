"""GET_ROWS and SET_ROWS on CUDA (spec/ops/get_rows.md, spec/ops/set_rows.md).

The indices are copied to the host and every one is checked against the indexed dimension
right before the kernel runs (an index out of range stops the graph); the kernel then reads a
private device copy of the checked indices, so a destination overlapping the index tensor
cannot change them under it.  GET_ROWS dequantises block formats in the kernel.  SET_ROWS
keeps ggml's CPU order for repeated indices (the last row wins): earlier duplicates are dropped
before the launch.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...graph.build import GraphInvalid
from ...graph.ops import Op
from ...graph.registry import kernel
from ...protocol.ggml_types import GgmlType

_FLOAT_DST = (GgmlType.F32, GgmlType.F16, GgmlType.BF16)
from ._common import (DEQUANT_TYPES, dequant, host_copy, is_bf16, launch, ld, overlaps,
                      runner, st, storage, tables, targ, unravel)

PLAIN_BITS, WIDEN, DEQUANT = 0, 1, 2


@cuda.jit
def get_rows_kernel(mode, code, n0, n1, n2, n3, s, so, ss0, ss1, ss2, ss3, sbf, idx,
                    d, do, ds0, ds1, ds2, ds3, bft, f16t):
    n = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        i0, i1, i2, i3 = unravel(i, n0, n1, n2)
        r = idx[(i3 * n2 + i2) * n1 + i1]
        base = so + r * ss1 + i2 * ss2 + i3 * ss3
        di = do + i0 * ds0 + i1 * ds1 + i2 * ds2 + i3 * ds3
        if mode == PLAIN_BITS:
            d[di] = s[base + i0 * ss0]
        elif mode == WIDEN:
            d[di] = ld(s, base + i0 * ss0, sbf, bft)
        else:
            d[di] = dequant(code, s, base, i0, f16t)


@cuda.jit
def set_rows_kernel(n0, nr, n2, n3, s, so, ss0, ss1, ss2, ss3, sbf, idx, n12, n11,
                    d, do, ds0, ds1, ds2, ds3, dbf, bft):
    n = n0 * nr * n2 * n3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        c, r, i2, i3 = unravel(i, n0, nr, n2)
        j = idx[((i3 % n12) * n11 + (i2 % n11)) * nr + r]
        if j < 0:                   # an earlier duplicate: the last row with this index wins
            continue
        v = ld(s, so + c * ss0 + r * ss1 + i2 * ss2 + i3 * ss3, sbf, bft)
        st(d, do + c * ds0 + j * ds1 + i2 * ds2 + i3 * ds3, v, dbf)


@kernel("cuda", Op.GET_ROWS)
def bind_get_rows(node):
    a, b = node.src[0], node.src[1]
    if a.type in (GgmlType.F32, GgmlType.I32):
        mode, sdt, ddt = PLAIN_BITS, np.uint32, np.uint32
    elif a.type in (GgmlType.F16, GgmlType.BF16):
        mode, sdt, ddt = WIDEN, storage(a), np.float32
    elif a.type in DEQUANT_TYPES:
        mode, sdt, ddt = DEQUANT, np.uint8, np.float32
    else:
        return None

    def run():
        n = node.nelements
        idx = host_copy(b, np.int32)[0]            # (A3, A2, n)
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= a.ne[1]:
                bad = lo if lo < 0 else hi
                raise GraphInvalid(f"node {node.describe()}: row index {bad} is outside src0's "
                                   f"{a.ne[1]} rows")
        if not n:
            return
        f16t, bft = tables(node.buffer.memory.device)
        d_idx = cuda.to_device(np.ascontiguousarray(idx, np.int64).reshape(-1))
        ts = targ(a, sdt, snapshot=overlaps(node, a))
        blocks, threads = launch(n)
        get_rows_kernel[blocks, threads](mode, a.type, *node.ne, *ts, is_bf16(a), d_idx,
                                         *targ(node, ddt), bft, f16t)
    return runner(node, run)


@kernel("cuda", Op.SET_ROWS)
def bind_set_rows(node):
    b, c = node.src[0], node.src[1]
    n_rows = node.ne[1]
    if node.type not in _FLOAT_DST:       # no quantising kernel on this device yet
        return None

    def run():
        if b.nelements == 0:
            return
        idx = host_copy(c, np.int64 if c.type == GgmlType.I64 else np.int32).astype(np.int64)
        bad = (idx < 0) | (idx >= n_rows)
        if bad.any():
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            raise GraphInvalid(f"node {node.describe()}: row index {int(idx[where])} at "
                               f"src1{list(where[::-1])} is outside [0, {n_rows})")
        idx = idx[0]                              # (n12, n11, nr)
        n12, n11, nr = idx.shape
        keep = idx.copy()
        for p in np.ndindex(n12, n11):            # within a plane the last equal index wins
            row = idx[p]
            _, last = np.unique(row[::-1], return_index=True)
            drop = np.ones(nr, bool)
            drop[nr - 1 - last] = False
            keep[p][drop] = -1
        _, bft = tables(node.buffer.memory.device)
        d_idx = cuda.to_device(np.ascontiguousarray(keep).reshape(-1))
        ts = targ(b, snapshot=overlaps(node, b))
        n = b.nelements
        blocks, threads = launch(n)
        set_rows_kernel[blocks, threads](b.ne[0], nr, b.ne[2], b.ne[3], *ts, is_bf16(b), d_idx,
                                         n12, n11, *targ(node),
                                         is_bf16(node), bft)
    return runner(node, run)

