"""CPY, CONT and DUP on CUDA (spec/ops/copy.md): element ``e`` of the source in flat
row-major order becomes element ``e`` of the destination, whatever the two layouts.

One thread per element: F32/F16/BF16 converted through float32 (rounding to nearest even),
I32 <-> F32, other same-type copies as raw element bits, block formats of the same type as raw
row bytes, and the dequantisable block formats widened to F32/F16/BF16 in the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ...protocol.ggml_types import GgmlType
from ._common import (DEQUANT_TYPES, STORAGE, dequant, is_bf16, launch, ld, overlaps,
                      runner, same_place, st, tables, targ, unravel)

_FLOATS = {GgmlType.F32, GgmlType.F16, GgmlType.BF16}
CONVERT, BITS, INT_TO_FLOAT, FLOAT_TO_INT, DEQUANT, ROW_BYTES = range(6)
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@cuda.jit
def copy_kernel(mode, code, n, sn0, sn1, sn2, s, so, ss0, ss1, ss2, ss3, sbf,
                dn0, dn1, dn2, d, do, ds0, ds1, ds2, ds3, dbf, bft, f16t):
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        if mode == ROW_BYTES:        # sn0/dn0: bytes per row; rows in flat order
            r = e // sn0
            k = e % sn0
            a1, a2, a3, _ = unravel(r, sn1, sn2, 1 << 62)
            b1, b2, b3, _ = unravel(r, dn1, dn2, 1 << 62)
            d[do + k + b1 * ds1 + b2 * ds2 + b3 * ds3] = s[so + k + a1 * ss1 + a2 * ss2 + a3 * ss3]
            continue
        j0, j1, j2, j3 = unravel(e, dn0, dn1, dn2)
        di = do + j0 * ds0 + j1 * ds1 + j2 * ds2 + j3 * ds3
        i0, i1, i2, i3 = unravel(e, sn0, sn1, sn2)
        if mode == DEQUANT:
            st(d, di, dequant(code, s, so + i1 * ss1 + i2 * ss2 + i3 * ss3, i0, f16t), dbf)
            continue
        si = so + i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3
        if mode == BITS:
            d[di] = s[si]
        elif mode == INT_TO_FLOAT:
            st(d, di, np.float32(s[si]), dbf)
        elif mode == FLOAT_TO_INT:
            d[di] = np.int32(ld(s, si, sbf, bft))
        else:
            st(d, di, ld(s, si, sbf, bft), dbf)


@kernel("cuda", Op.CPY, Op.CONT, Op.DUP)
def bind(node):
    a = node.src[0]
    blocks_same = a.type == node.type and a.type not in STORAGE
    if blocks_same:
        mode = ROW_BYTES
        sdt = ddt = np.uint8
    elif a.type in DEQUANT_TYPES:
        mode, sdt, ddt = DEQUANT, np.uint8, STORAGE[node.type]
    elif a.type == node.type:
        mode = BITS
        sdt = ddt = _BITS[np.dtype(STORAGE[a.type]).itemsize]
    elif a.type == GgmlType.I32:
        mode, sdt, ddt = INT_TO_FLOAT, np.int32, STORAGE[node.type]
    elif node.type == GgmlType.I32:
        mode, sdt, ddt = FLOAT_TO_INT, STORAGE[a.type], np.int32
    elif a.type in _FLOATS and node.type in _FLOATS:
        mode, sdt, ddt = CONVERT, STORAGE[a.type], STORAGE[node.type]
    else:
        return None

    def run():
        if not node.nelements:
            return
        f16t, bft = tables(node.buffer.memory.device)
        ts = targ(a, sdt, snapshot=overlaps(node, a) and not same_place(node, a))
        td = targ(node, ddt)
        if mode == ROW_BYTES:
            tr = a.traits
            row_bytes = a.ne[0] // tr.block_size * tr.type_size
            n = row_bytes * a.ne[1] * a.ne[2] * a.ne[3]
            sn = (row_bytes, a.ne[1], a.ne[2])
            dn = (row_bytes, node.ne[1], node.ne[2])
        else:
            n = node.nelements
            sn, dn = a.ne[:3], node.ne[:3]
        blocks, threads = launch(n)
        copy_kernel[blocks, threads](mode, a.type, n, *sn, *ts, is_bf16(a), *dn, *td,
                                     is_bf16(node), bft, f16t)
    return runner(node, run)
