"""ADD, SUB, MUL, DIV on CUDA: elementwise with src1 tiled over src0 (spec/ops/binary.md).

One thread per destination element (grid-stride), float32 arithmetic, F32/F16/BF16 operands
loaded and stored in their own types.  The destination may be src0 itself; a destination that
overlaps a source in any other way reads a private copy of that source.
"""

from __future__ import annotations

from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ._common import is_bf16, launch, ld, reads_safely, runner, st, tables, targ, unravel

_CODES = {Op.ADD: 0, Op.SUB: 1, Op.MUL: 2, Op.DIV: 3}


@cuda.jit
def binary_kernel(code, n0, n1, n2, n3, a, ao, as0, as1, as2, as3, abf,
                  b, bo, bs0, bs1, bs2, bs3, bn0, bn1, bn2, bn3, bbf,
                  d, do, ds0, ds1, ds2, ds3, dbf, bft):
    n = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        i0, i1, i2, i3 = unravel(i, n0, n1, n2)
        x = ld(a, ao + i0 * as0 + i1 * as1 + i2 * as2 + i3 * as3, abf, bft)
        y = ld(b, bo + (i0 % bn0) * bs0 + (i1 % bn1) * bs1 + (i2 % bn2) * bs2
               + (i3 % bn3) * bs3, bbf, bft)
        if code == 0:
            v = x + y
        elif code == 1:
            v = x - y
        elif code == 2:
            v = x * y
        else:
            v = x / y
        st(d, do + i0 * ds0 + i1 * ds1 + i2 * ds2 + i3 * ds3, v, dbf)


@kernel("cuda", Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def bind(node):
    a, b = node.src[0], node.src[1]
    code = _CODES[Op(node.op)]

    def run():
        n = node.nelements
        if not n:
            return
        _, bft = tables(node.buffer.memory.device)
        ta = targ(a, snapshot=not reads_safely(node, a))
        tb = targ(b, snapshot=not reads_safely(node, b))
        blocks, threads = launch(n)
        binary_kernel[blocks, threads](code, *node.ne, *ta, is_bf16(a), *tb, *b.ne, is_bf16(b),
                                       *targ(node), is_bf16(node), bft)
    return runner(node, run)
