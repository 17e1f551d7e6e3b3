"""CPY, CONT and DUP: copy a tensor's elements, in ggml's flat element order, converting the
type when asked (spec/ops/copy.md).

The source is read in row-major order (``ne[0]`` fastest) and written in the destination's
row-major order, whatever the two tensors' shapes and strides, as long as they hold the same
number of elements.  Conversions: between F32, F16 and BF16 (rounding to nearest even), and
between I32 and F32.  Block types are copied as raw blocks when source and destination have
the same type and the same row length.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.copy import _PLAIN
from ..graph.validators.types import QUANTIZE_TYPES
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import load_f32, rows_u8, store_f32, view
from .parallel import sized_kernel
from .quantize import quantize_into, row_bytes
from .quants import QUANT_WEIGHT_TYPES, dequantize_rows




@sized_kernel(1, cache=True, nogil=True)
def copy_rows_u8(src_rows, dst_rows):
    """Copy (n, row_bytes) byte rows (the two arrays may have any row strides)."""
    n, width = src_rows.shape
    for r in prange(n):
        for k in range(width):
            dst_rows[r, k] = src_rows[r, k]


def reference(values: np.ndarray, dst_shape) -> np.ndarray:
    """Numpy oracle: the source's elements in flat order, laid out in the destination shape."""
    return np.asarray(values).reshape(-1).reshape(dst_shape)


def _flat_rows(node: Node) -> np.ndarray:
    """All rows of a block-typed tensor, in flat order, as a (rows, row_bytes) array."""
    r = rows_u8(node)
    return r.reshape(-1, r.shape[-1]) if r.flags.c_contiguous else _rows_2d(r)


def _rows_2d(r: np.ndarray) -> np.ndarray:
    # A strided 4-D row view flattened without copying when the outer strides allow it,
    # else with a copy (read side only).
    try:
        return r.reshape(-1, r.shape[-1])
    except ValueError:
        return np.ascontiguousarray(r).reshape(-1, r.shape[-1])


@kernel("cpu", Op.CPY, Op.CONT, Op.DUP)
def bind_copy_ops(node: Node):
    """CPY (src0 into the layout of src1, dst aliases src1), CONT and DUP (fresh copies): the
    CPU runner of a validated node."""
    a = node.src[0]
    shape = (node.ne[3], node.ne[2], node.ne[1], node.ne[0])
    if a.type == node.type and a.type not in _PLAIN:
        def run_blocks():
            s = _flat_rows(a)
            d = rows_u8(node)
            if np.may_share_memory(s, d):
                s = s.copy()
            d2 = d.reshape(-1, d.shape[-1]) if d.flags.c_contiguous else None
            if d2 is not None:
                copy_rows_u8(s, d2)
            else:
                d[...] = s.reshape(d.shape)
        return run_blocks
    if a.type in QUANT_WEIGHT_TYPES:
        return lambda: store_f32(node, dequantize_rows(a.type, rows_u8(a), a.ne[0]).reshape(shape))
    if node.type in QUANTIZE_TYPES:
        k = a.ne[0]
        copy_first = overlaps(node, a)

        def run_quantize():
            values = load_f32(a).reshape(-1, k)       # a view only for packed F32 rows
            if copy_first:
                values = values.copy()
            out = rows_u8(node).reshape(-1, row_bytes(node.type, k))   # dst is contiguous
            quantize_into(node.type, values, out)
        return run_quantize
    if a.type == node.type:
        def run_same():
            values = view(a).reshape(-1)  # copies only when src0 is strided
            view(node)[...] = values.reshape(shape)
        return run_same
    if node.type == GgmlType.I32:
        return lambda: view(node).__setitem__(..., load_f32(a).reshape(shape).astype(np.int32))
    if a.type == GgmlType.I32:
        return lambda: store_f32(node, view(a).astype(np.float32).reshape(shape))
    return lambda: store_f32(node, np.array(load_f32(a), np.float32).reshape(shape))
