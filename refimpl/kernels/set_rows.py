"""SET_ROWS: scatter rows of src0 into the destination at row indices from src1
(spec/ops/set_rows.md).

``dst[i3, i2, idx[i3 % n12, i2 % n11, i], :] = src0[i3, i2, i, :]``.  The destination is a view
of src2 (the tensor being updated, typically a KV cache); rows that no index names keep their
bytes.  Every index is checked against ``dst.ne[1]`` before anything is written, which closes the
out-of-bounds write of llama.cpp issue #26912: an index out of range stops the graph.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import GraphInvalid, Node
from ..graph.checks import F16, F32, overlaps
from ..graph.validators.types import QUANTIZE_TYPES
from ..graph.ops import Op
from ..graph.registry import kernel
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import f32_to_bf16, load_f32, rows_u8, view
from .parallel import sized_kernel
from .quantize import quantize_into, row_bytes
from .numeric import f16_bits



@sized_kernel(0, cache=True, nogil=True)
def scatter_rows(rows, idx, dst, to_f16):
    """``dst[i3, i2, idx[0, i3 % n12, i2 % n11, i], :] = rows[i3, i2, i, :]``.

    ``rows`` and ``dst`` share a dtype (float32, uint16 bit patterns or row bytes), or, with
    ``to_f16``, ``rows`` is float32 and ``dst`` F16 (uint16 bits): each value is rounded to
    the nearest half as it is stored (:func:`.numeric.f16_bits`; ``rows`` must not overlap
    ``dst``).  ``idx`` (int32 or int64) has shape (1, n12, n11, nr) and every
    entry must already be known to be in range.  Within one (i3, i2) plane rows are written in
    order, so a repeated index keeps the last row.
    """
    n3, n2, nr, nc = rows.shape
    n12, n11 = idx.shape[1], idx.shape[2]
    for p in prange(n3 * n2):
        i3 = p // n2
        i2 = p % n2
        for i in range(nr):
            j = idx[0, i3 % n12, i2 % n11, i]
            if to_f16:
                for c in range(nc):
                    dst[i3, i2, j, c] = f16_bits(rows[i3, i2, i, c])
            else:
                for c in range(nc):
                    dst[i3, i2, j, c] = rows[i3, i2, i, c]


@njit(cache=True, nogil=True)
def first_bad_index(idx, n_rows):
    """The position (in C order) of the first index outside ``[0, n_rows)``, or -1."""
    n3, n2, n1, n0 = idx.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                for i0 in range(n0):
                    j = idx[i3, i2, i1, i0]
                    if j < 0 or j >= n_rows:
                        return ((i3 * n2 + i2) * n1 + i1) * n0 + i0
    return -1


def reference(dst: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Numpy oracle: a copy of ``dst`` (ne3, ne2, ne1, ne0) with rows replaced.

    ``rows`` is (ne3, ne2, nr, ne0) and ``idx`` (1, n12, n11, nr) with the two head dimensions
    repeating.  Values are stored as they are; the caller rounds to the destination type.
    """
    out = np.array(dst, copy=True)
    n3, n2, nr, _ = rows.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i in range(nr):
                j = int(idx[0, i3 % idx.shape[1], i2 % idx.shape[2], i])
                out[i3, i2, j, :] = rows[i3, i2, i, :]
    return out


def _payload(rows_node: Node, dst_type: int) -> np.ndarray:
    """A copy of src0's rows in the destination's storage format (float32, uint16 bits for
    F16/BF16, or packed row bytes for a block format, quantised as ggml's ``from_float``
    does: :func:`.quantize.quantize_rows`)."""
    if dst_type in QUANTIZE_TYPES:
        values = np.ascontiguousarray(load_f32(rows_node), np.float32)
        n3, n2, nr, k = values.shape
        out = np.empty((n3 * n2 * nr, row_bytes(dst_type, k)), np.uint8)
        quantize_into(dst_type, values.reshape(-1, k), out)
        return out.reshape(n3, n2, nr, -1)
    rows = view(rows_node)
    if dst_type == GgmlType.F32:
        return rows.astype(np.float32)          # F16 -> F32 is exact
    if dst_type == GgmlType.F16:
        if rows_node.type == GgmlType.F16:
            return np.array(rows, copy=True).view(np.uint16)
        with np.errstate(over="ignore"):
            return rows.astype(np.float16).view(np.uint16)
    values = rows.astype(np.float32)             # BF16: via float32, round to nearest even
    return f32_to_bf16(values).reshape(values.shape)


@kernel("cpu", Op.SET_ROWS)
def bind_set_rows(node: Node):
    """SET_ROWS (ggml_set_rows): the CPU runner of a validated node."""
    b, c = node.src[0], node.src[1]
    n_rows = node.ne[1]
    storage = np.float32 if node.type == GgmlType.F32 else np.uint16
    if node.type in QUANTIZE_TYPES:
        storage = "rows"        # scattered as whole row bytes
    if (node.type == F16 and b.type == F32 and b.nelements
            and not overlaps(node, b)):
        return _bind_f32_to_f16(node, b, c, n_rows)

    def run():
        if b.nelements == 0:
            return
        idx = view(c).astype(np.int64)
        check_indices(node, idx, n_rows, "row index")
        # _payload always makes a copy, so the scatter never reads what it writes
        dst = rows_u8(node) if storage == "rows" else view(node, storage)
        scatter_rows(_payload(b, node.type), idx, dst, False)
    return run


def _bind_f32_to_f16(node: Node, b: Node, c: Node, n_rows: int):
    """The KV-cache store (F32 rows into an F16 cache), bound once: the indices are
    checked, then the rows converted as they are scattered, with no temporary."""
    rows, idx, dst = view(b), view(c), view(node, np.uint16)

    def run():
        check_indices(node, idx, n_rows, "row index")
        scatter_rows(rows, idx, dst, True)
    return run


def check_indices(node: Node, idx: np.ndarray, n: int, what: str = "row index",
                  which: int = 1) -> None:
    """Raise GraphInvalid (before anything is written) unless every index of the 4-D array
    ``idx`` (a view of src[which]) lies in ``[0, n)``; the message names the first that does
    not."""
    bad = first_bad_index(idx, n)
    if bad >= 0:
        where = np.unravel_index(bad, idx.shape)
        raise GraphInvalid(f"node {node.describe()}: {what} {int(idx[where])} at "
                           f"src{which}{[int(x) for x in where[::-1]]} is outside [0, {n})")
