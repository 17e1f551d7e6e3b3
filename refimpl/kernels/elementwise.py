"""TRI, DIAG, DIAG_MASK_INF, DIAG_MASK_ZERO, ARANGE, TIMESTEP_EMBEDDING, ACC and SET
(spec/ops/elementwise.md).

The ops that compute one value from one (SQR, SQRT, LOG, SIN, COS, LEAKY_RELU, ADD1) share
the UNARY kernel (:data:`.unary.MATH_CODES`).  What is here moves values (TRI, DIAG, the
diagonal masks, SET), adds them (ACC) or makes them from op parameters (ARANGE,
TIMESTEP_EMBEDDING), in float32 as ggml-cpu does.  Every op reads all its sources before it
writes dst, so a dst that shares bytes with a source gets the same values.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import view
from .numeric import fma32


def _shape(node: Node) -> tuple:
    return (node.ne[3], node.ne[2], node.ne[1], node.ne[0])


# -- triangles and diagonals ------------------------------------------------------------------

def tri_mask(n1: int, n0: int, kind: int) -> np.ndarray:
    """Which elements TRI keeps, shape (n1, n0): kind 0 upper with the diagonal (column >=
    row), 1 strictly upper, 2 lower with the diagonal, 3 strictly lower."""
    col = np.arange(n0)[None, :]
    row = np.arange(n1)[:, None]
    return [col >= row, col > row, col <= row, col < row][kind]


@kernel("cpu", Op.TRI)
def bind_tri(node: Node):
    """TRI: one triangle of each matrix kept, the rest +0: the CPU runner of a validated
    node."""
    av, out = view(node.src[0]), view(node)
    keep = tri_mask(node.ne[1], node.ne[0], node.param_i32(0))
    zero = np.float32(0.0)

    def run():
        out[...] = np.where(keep, av, zero)
    return run


@kernel("cpu", Op.DIAG)
def bind_diag(node: Node):
    """DIAG: dst[i3, i2, i, i] = src0[i3, i2, 0, i], every other element +0: the CPU runner
    of a validated node."""
    av, out = view(node.src[0]), view(node)
    i = np.arange(node.ne[0])

    def run():
        d = np.zeros(out.shape, np.float32)
        d[..., i, i] = av[..., 0, :]
        out[...] = d
    return run


def diag_mask(n1: int, n0: int, n_past: int) -> np.ndarray:
    """Which elements DIAG_MASK_* overwrite, shape (n1, n0): column > n_past + row."""
    return np.arange(n0)[None, :] > n_past + np.arange(n1)[:, None]


@kernel("cpu", Op.DIAG_MASK_INF, Op.DIAG_MASK_ZERO)
def bind_diag_mask(node: Node):
    """DIAG_MASK_INF / DIAG_MASK_ZERO: src0 with the elements past column n_past + row set to
    -inf / 0: the CPU runner of a validated node."""
    av, out = view(node.src[0]), view(node)
    masked = diag_mask(node.ne[1], node.ne[0], node.param_i32(0))
    value = np.float32(-np.inf if node.op == Op.DIAG_MASK_INF else 0.0)

    def run():
        out[...] = np.where(masked, value, av)
    return run


# -- values from op parameters ----------------------------------------------------------------

@njit(cache=True, nogil=True)
def arange_f32(out, start, step):
    """out[i] = start + step·i in float32, the product fused into the addition as ggml's
    build fuses it."""
    for i in range(out.shape[0]):
        out[i] = fma32(step, np.float32(i), start)


def reference_arange(start: float, step: float, n: int) -> np.ndarray:
    """Numpy oracle of ARANGE in float64."""
    return np.float64(np.float32(start)) + np.float64(np.float32(step)) * np.arange(n)


@kernel("cpu", Op.ARANGE)
def bind_arange(node: Node):
    """ARANGE: start, step in op_params[0], [2]: the CPU runner of a validated node (dst is
    contiguous)."""
    out = view(node).reshape(-1)
    start, step = np.float32(node.param_f32(0)), np.float32(node.param_f32(2))
    return lambda: arange_f32(out, start, step)


@njit(cache=True, nogil=True)
def timestep_embedding_f32(ts, out, max_period):
    """out[i, j] = cos(t·f_j) and out[i, j + half] = sin(t·f_j) for each timestep t = ts[i],
    f_j = exp(-log(max_period)·j / half), half = dim // 2, in float32 (an odd dim's last
    column is 0)."""
    n, dim = out.shape
    half = dim // 2
    neg_log = -np.float32(math.log(np.float32(max_period)))
    for i in range(n):
        t = ts[i]
        for j in range(half):
            freq = np.float32(math.exp(neg_log * np.float32(j) / np.float32(half)))
            arg = t * freq
            out[i, j] = math.cos(arg)
            out[i, j + half] = math.sin(arg)
        if dim % 2:
            out[i, dim - 1] = np.float32(0.0)


def reference_timestep_embedding(ts: np.ndarray, dim: int, max_period: int) -> np.ndarray:
    """Numpy oracle of TIMESTEP_EMBEDDING in float64, shape (len(ts), dim)."""
    half = dim // 2
    freq = np.exp(-math.log(max_period) * np.arange(half) / max(half, 1))
    arg = np.asarray(ts, np.float64)[:, None] * freq[None, :]
    out = np.zeros((len(ts), dim))
    out[:, :half], out[:, half:2 * half] = np.cos(arg), np.sin(arg)
    return out


@kernel("cpu", Op.TIMESTEP_EMBEDDING)
def bind_timestep_embedding(node: Node):
    """TIMESTEP_EMBEDDING: dim, max_period in op_params[0], [1]: the CPU runner of a validated
    node."""
    ts, out = view(node.src[0])[0, 0, 0], view(node)[0, 0]
    max_period = node.param_i32(1)

    def run():
        tmp = np.empty(out.shape, np.float32)
        timestep_embedding_f32(ts, tmp, max_period)
        out[...] = tmp
    return run


# -- views written: ACC and SET ---------------------------------------------------------------

def region(node: Node, base: Node) -> np.ndarray:
    """The view ACC or SET writes (``node``'s op_params nb1, nb2, nb3, offset with src1's
    shape), laid over the bytes of ``base`` (dst, or src0 for ACC's addend); the validator
    has checked that it lies inside ``base``."""
    b = node.src[1]
    esize = base.traits.type_size
    nb1, nb2, nb3, offset = (node.param_i32(i) for i in range(4))
    return np.ndarray(_shape(b), dtype=view(base).dtype, buffer=base.buffer.memory.array,
                      offset=base.offset + offset, strides=(nb3, nb2, nb1, esize))


@kernel("cpu", Op.ACC, Op.SET)
def bind_acc_set(node: Node):
    """ACC: dst = src0, then the view += src1; SET: dst = src0, then the view = src1 (src0 not
    copied when op_params[4], inplace, is set): the CPU runner of a validated node."""
    a, b = node.src[0], node.src[1]
    out, av, bv = view(node), view(a), view(b)
    dst_region = region(node, node)
    addend = region(node, a) if node.op == Op.ACC else None
    copy = node.param_i32(4) == 0 and not (a.buffer.memory is node.buffer.memory
                                           and a.offset == node.offset)

    def run():
        values = addend + bv if addend is not None else bv.copy()
        if copy:
            out[...] = av
        dst_region[...] = values
    return run


def reference_acc_set(op: Op, a: np.ndarray, b: np.ndarray, nb: tuple, offset: int,
                      inplace_dst: np.ndarray | None = None) -> np.ndarray:
    """Numpy oracle of ACC / SET on contiguous arrays: ``nb`` = (nb1, nb2, nb3) and
    ``offset`` in bytes of a's element; with ``inplace_dst`` the starting dst (no copy)."""
    out = (a if inplace_dst is None else inplace_dst).astype(a.dtype).copy()
    flat = out.reshape(-1)
    esize = a.dtype.itemsize
    src = a.reshape(-1)
    n3, n2, n1, n0 = b.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                for i0 in range(n0):
                    k = (offset + i3 * nb[2] + i2 * nb[1] + i1 * nb[0]) // esize + i0
                    v = b[i3, i2, i1, i0]
                    flat[k] = src[k] + v if op == Op.ACC else v
    return out
