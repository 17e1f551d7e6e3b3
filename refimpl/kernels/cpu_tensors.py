"""Typed numpy views of graph tensors in CPU memory, and float conversions at the edges.

Numba has no half-precision type on the CPU, so kernels compute in float32: F16 and BF16
tensors are converted when loaded (:func:`load_f32`) and when stored (:func:`store_f32`),
with ggml's rounding (round-to-nearest-even for both).  Quantised tensors are seen as rows of
raw bytes (:func:`rows_u8`).  Views are built with numpy's bounds-checked constructor over
the buffer, on top of the placement check already made: a view can never reach outside its
buffer.
"""

from __future__ import annotations

import numpy as np

from numba import njit, prange

from ..graph.build import Node
from ..protocol.ggml_types import GgmlType
from .numeric import round_f16
from .parallel import sized_kernel
from .quants import F16_TABLE
from .simd import HAS_F16C, round_f16_row, widen_f16_16

#: Storage dtype of the element types kernels read element by element (BF16 as its bits);
#: block formats have none.  The CUDA kernels use the same table.
STORAGE = {
    GgmlType.F32: np.float32, GgmlType.F16: np.float16, GgmlType.BF16: np.uint16,
    GgmlType.I8: np.int8, GgmlType.I16: np.int16, GgmlType.I32: np.int32,
    GgmlType.I64: np.int64, GgmlType.F64: np.float64,
}


def view(node: Node, dtype=None) -> np.ndarray:
    """The tensor as a 4-D numpy array in ggml order reversed: shape (ne3, ne2, ne1, ne0).

    ``dtype`` defaults to the tensor's own element type (BF16 appears as uint16 bits).
    """
    key = dtype or node.type
    v = node.views.get(key)
    if v is None:      # made once per node: a bound graph runs many times
        dt = np.dtype(dtype or STORAGE[node.type])
        ne, nb = node.ne, node.nb
        v = np.ndarray((ne[3], ne[2], ne[1], ne[0]), dtype=dt, buffer=node.buffer.memory.array,
                       offset=node.offset, strides=(nb[3], nb[2], nb[1], nb[0]))
        node.views[key] = v
    return v


def rows_u8(node: Node) -> np.ndarray:
    """The tensor as raw row bytes: shape (ne3, ne2, ne1, row_bytes)."""
    v = node.views.get("rows")
    if v is None:
        tr = node.traits
        ne, nb = node.ne, node.nb
        row_bytes = ne[0] // tr.block_size * tr.type_size
        v = np.ndarray((ne[3], ne[2], ne[1], row_bytes), dtype=np.uint8,
                       buffer=node.buffer.memory.array, offset=node.offset,
                       strides=(nb[3], nb[2], nb[1], 1))
        node.views["rows"] = v
    return v


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns to float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to BF16 bit patterns, rounding to nearest even as ggml does (NaNs stay NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


@sized_kernel(1, cache=True, nogil=True)
def _widen_f16(bits, out, table, hardware):
    """F16 bit patterns ``bits`` (uint16, 4-D; with ``hardware``, rows contiguous) as float32
    into ``out`` (C order): sixteen at a time by the CPU's conversion (:func:`.simd.
    widen_f16_16`), the rest through ``table`` (:data:`~.quants.F16_TABLE`).  Exact either
    way; the table alone is three times numpy's ``astype`` here, the hardware ten times."""
    n3, n2, n1, n0 = bits.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        src, dst = bits[i3, i2, i1], out[i3, i2, i1]
        start = 0
        if hardware:
            sp, dp = src.ctypes.data, dst.ctypes.data
            start = n0 - n0 % 16
            for i0 in range(0, start, 16):
                widen_f16_16(sp + 2 * i0, dp + 4 * i0)
        for i0 in range(start, n0):
            dst[i0] = table[src[i0]]


def f16_to_f32(values: np.ndarray, hardware: bool | None = None) -> np.ndarray:
    """A 4-D float16 array (or its uint16 bit patterns) as a C-ordered float32 copy
    (``hardware=False`` forces the table, for the tests)."""
    out = np.empty(values.shape, np.float32)
    if out.size:
        if hardware is None:
            hardware = HAS_F16C
        _widen_f16(values.view(np.uint16), out, F16_TABLE,
                   bool(hardware and values.strides[-1] == 2))
    return out


def load_f32(node: Node) -> np.ndarray:
    """The tensor's values as float32 (a view for F32 tensors, a converted copy otherwise)."""
    if node.type == GgmlType.F32:
        return view(node)
    if node.type == GgmlType.F16:
        return f16_to_f32(view(node))
    if node.type == GgmlType.BF16:
        return bf16_to_f32(view(node))
    return view(node).astype(np.float32)


def store_f32(node: Node, values: np.ndarray) -> None:
    """Write float32 ``values`` (shape (ne3, ne2, ne1, ne0)) into the tensor, converting."""
    dst = view(node)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the right result
        if node.type == GgmlType.BF16:
            dst[...] = f32_to_bf16(values).reshape(dst.shape)
        else:
            dst[...] = values


@njit(cache=True, nogil=True)
def _round_f16_flat(src, dst):
    """``dst`` = the float32 values ``src`` (both 1-D, contiguous) rounded to half precision:
    eight at a time by the CPU's conversion (:func:`.simd.round_f16_row`), the rest
    arithmetically (:func:`.numeric.round_f16`).  Both round to nearest, ties to even."""
    n = src.shape[0]
    round_f16_row(src.ctypes.data, dst.ctypes.data, n)
    for i in range(n - n % 8, n):
        dst[i] = round_f16(src[i])


def round_to(values: np.ndarray, type_: int) -> np.ndarray:
    """``values`` rounded to the precision of ``type_`` and back to float32 (for emulating
    what ggml's CPU backend does when it converts an operand: F16 activations of a prompt's
    products, for one)."""
    if type_ == GgmlType.F16:
        if HAS_F16C and values.dtype == np.float32 and values.size:
            # numpy's float16 cast runs in software here, 60 times slower: a prompt of 128
            # tokens spent half a millisecond per product on it.
            src = np.ascontiguousarray(values)
            out = np.empty(src.shape, np.float32)
            _round_f16_flat(src.reshape(-1), out.reshape(-1))
            return out
        with np.errstate(over="ignore"):
            return values.astype(np.float16).astype(np.float32)
    if type_ == GgmlType.BF16:
        return bf16_to_f32(f32_to_bf16(values).reshape(values.shape))
    return values
