"""GET_ROWS: gather rows of src0 picked by the I32 indices in src1 (spec/ops/get_rows.md).

src0 is (ne0, R, A2, A3), src1 holds indices (n, A2, A3, 1) and dst is (ne0, n, A2, A3):
``dst[:, i, j, k] = src0[:, src1[i, j, k], j, k]``.  dst is float32 (block formats are
dequantised, F16/BF16 widened) except for I32 sources, whose rows are copied as I32.

Every index is checked against R in the runner, on a private copy of the indices, right
before the kernel runs; one out of range stops the graph (llama.cpp #26825 read outside the
tensor instead).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..graph.build import GraphInvalid, Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import rows_u8, view
from .parallel import sized_kernel
from .quants import (BF16, F16, F16_TABLE, F32, I32, MORE_WEIGHT_TYPES, dequantize_row,
                     dequantize_rows)

#: Source types GET_ROWS serves.


def _quiet_f16_table() -> np.ndarray:
    """F16 bit pattern -> float32 as the F16C conversion ggml widens with: like
    :data:`~.quants.F16_TABLE`, except that signalling NaNs come out quiet (the top mantissa
    bit set, the rest of the payload kept)."""
    table = F16_TABLE.copy()
    bits = table.view(np.uint32)
    bits[np.isnan(table)] |= 0x00400000
    return table


#: The table :func:`gather_f16` widens through.
F16_QUIET_TABLE = _quiet_f16_table()


@sized_kernel(2, cache=True, nogil=True)
def gather_plain(src, idx, out):
    """Rows of a plain-typed ``src`` (A3, A2, R, ne0) picked by ``idx`` (A3, A2, n) into
    ``out`` (A3, A2, n, ne0); element bits are copied unchanged."""
    a3, a2, n = idx.shape
    for j in prange(a3 * a2 * n):
        i3 = j // (a2 * n)
        i2 = (j // n) % a2
        i1 = j % n
        r = idx[i3, i2, i1]
        for e in range(out.shape[3]):
            out[i3, i2, i1, e] = src[i3, i2, r, e]


@sized_kernel(2, cache=True, nogil=True)
def gather_f16(src, idx, out, table):
    """Like :func:`gather_plain` for F16 bit patterns (uint16), widened to float32 through
    ``table`` (:data:`F16_QUIET_TABLE`)."""
    a3, a2, n = idx.shape
    for j in prange(a3 * a2 * n):
        i3 = j // (a2 * n)
        i2 = (j // n) % a2
        i1 = j % n
        r = idx[i3, i2, i1]
        for e in range(out.shape[3]):
            out[i3, i2, i1, e] = table[src[i3, i2, r, e]]


@sized_kernel(2, cache=True, nogil=True)
def gather_bf16(src, idx, out_bits):
    """Like :func:`gather_plain` for BF16 bit patterns (uint16): the float32 bit pattern of
    a BF16 value is its 16 bits followed by 16 zero bits."""
    a3, a2, n = idx.shape
    for j in prange(a3 * a2 * n):
        i3 = j // (a2 * n)
        i2 = (j // n) % a2
        i1 = j % n
        r = idx[i3, i2, i1]
        for e in range(out_bits.shape[3]):
            out_bits[i3, i2, i1, e] = np.uint32(src[i3, i2, r, e]) << 16


@sized_kernel(3, cache=True, nogil=True)
def gather_quant(code, src, idx, out, table):
    """Rows of a block-format ``src`` (uint8 (A3, A2, R, row_bytes)) picked by ``idx``,
    dequantised into ``out`` (A3, A2, n, ne0).  (Numba's cache does not see changes to
    :func:`~.quants.dequantize_row`, which is compiled into this kernel: a new block format
    there needs an edit here too.)"""
    a3, a2, n = idx.shape
    for j in prange(a3 * a2 * n):
        i3 = j // (a2 * n)
        i2 = (j // n) % a2
        i1 = j % n
        q = np.empty(256, np.int32)
        dequantize_row(code, src[i3, i2, idx[i3, i2, i1]], out[i3, i2, i1], table, True, q)


def reference(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Numpy oracle: ``rows`` (A3, A2, R, ne0) already as values (dequantised), ``idx``
    (A3, A2, n) -> (A3, A2, n, ne0)."""
    a3, a2, n = idx.shape
    out = np.empty((a3, a2, n, rows.shape[3]), rows.dtype)
    for i3 in range(a3):
        for i2 in range(a2):
            out[i3, i2] = rows[i3, i2][idx[i3, i2]]
    return out


def checked_indices(node: Node, idx_node: Node, limit: int, what: str = "row index",
                    of: str = "src0's {} rows") -> np.ndarray:
    """A private copy of the indices (A3, A2, n), every one verified to lie in [0, limit)
    (``what`` and ``of`` name them in the refusal)."""
    idx = np.array(view(idx_node)[0], dtype=np.int32, copy=True)
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise GraphInvalid(f"node {node.describe()}: {what} {bad} is outside "
                               f"{of.format(limit)}")
    return idx


def _run(node: Node, a: Node, b: Node) -> None:
    idx = checked_indices(node, b, a.ne[1])
    shape = (node.ne[3], node.ne[2], node.ne[1], node.ne[0])
    if a.type in (F32, I32):
        out = np.empty(shape, np.uint32)
        if out.size:
            gather_plain(view(a, np.uint32), idx, out)
        view(node, np.uint32)[...] = out
        return
    out = np.empty(shape, np.float32)
    if out.size:
        if a.type == F16:
            gather_f16(view(a, np.uint16), idx, out, F16_QUIET_TABLE)
        elif a.type == BF16:
            gather_bf16(view(a, np.uint16), idx, out.view(np.uint32))
        elif a.type in MORE_WEIGHT_TYPES:    # gather the packed rows, then dequantise them
            rows = rows_u8(a)
            i3, i2 = np.indices(idx.shape[:2])
            out[...] = dequantize_rows(a.type, rows[i3[..., None], i2[..., None], idx], a.ne[0])
        else:
            gather_quant(a.type, rows_u8(a), idx, out, F16_TABLE)
    view(node)[...] = out


@kernel("cpu", Op.GET_ROWS)
def bind_get_rows(node: Node):
    """GET_ROWS from F32, F16, BF16, I32 and every type of QUANT_WEIGHT_TYPES: the CPU runner
    of a validated node."""
    a, b = node.src[0], node.src[1]
    return lambda: _run(node, a, b)
