"""What ggml accepts for the elementwise ops of spec/ops/elementwise.md: SQR, SQRT, LOG, SIN,
COS, LEAKY_RELU, ADD1, TRI, DIAG, DIAG_MASK_INF, DIAG_MASK_ZERO, ARANGE, TIMESTEP_EMBEDDING,
and the view-writing ACC and SET (validation, any device)."""

from __future__ import annotations

import math

import numpy as np

from ..build import Node
from ..checks import (
    BF16,
    block_rows,
    F16,
    F32,
    I32,
    elementwise_strides,
    fail,
    is_contiguous,
    no_src_beyond,
    only_source,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates
from .types import QUANTIZE_TYPES

#: (src0, dst) type pairs of ggml-cpu's one-value-from-one kernels (``unary_op``): one type
#: throughout, or F16/BF16 widened into an F32 dst.
MAP_TYPES = frozenset({(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)})


def _plain(node: Node, *ts) -> None:
    for t, what in ts:
        elementwise_strides(t, node, what)


@validates(Op.SQR, Op.SQRT, Op.LOG, Op.SIN, Op.COS)
def check_math_ops(node: Node) -> None:
    """SQR, SQRT, LOG, SIN, COS: one value from one, dst of src0's shape; F32, F16 or BF16,
    or F16/BF16 into F32: raise GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    _plain(node, (node, "dst"), (a, "src0"))
    if (a.type, node.type) not in MAP_TYPES:
        fail(node, f"src0 {a.traits.name} into dst {node.traits.name} is not a type pair "
                   f"ggml computes")
    same_shape(node, a, node, "dst and src0")


@validates(Op.LEAKY_RELU)
def check_leaky_relu(node: Node) -> None:
    """LEAKY_RELU (ggml_leaky_relu): slope in op_params[0] (float); F32 or F16, dst of
    src0's type and shape: raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {F32, F16})
    require(node.type == a.type, node, "dst must have src0's type")
    same_shape(node, a, node, "dst and src0")


@validates(Op.ADD1)
def check_add1(node: Node) -> None:
    """ADD1 (ggml_add1): src1 is one value added to every element of src0; dst of src0's type
    and shape; src0 F32 with an F32 src1, F16/BF16 with an F32 src1 or one of src0's type, or
    a block format refimpl quantises (QUANTIZE_TYPES) with an F32 src1, rows packed and dst
    3-D at most: raise GraphInvalid unless ggml would accept the node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    type_in(a, {F32, F16, BF16} | QUANTIZE_TYPES, node, "src0")
    require(node.type == a.type, node, "dst must have src0's type")
    _plain(node, (b, "src1"))
    require(b.nelements == 1 and b.ne == (1, 1, 1, 1), node, "src1 must be a scalar")
    same_shape(node, a, node, "dst and src0")
    if a.type in QUANTIZE_TYPES:
        if b.type != F32:
            fail(node, f"src1 must be F32, not {b.traits.name}")
        block_rows(a, node, "src0")
        block_rows(node, node, "dst")
        require(node.nb[1] <= node.nb[2] <= node.nb[3], node, "dst must not be permuted")
        # ggml-cpu places dst row (i1, i2, i3) at i1*nb1 + i2*nb2 + i3*nb0: right only in 3-D
        require(node.ne[3] == 1, node, "a block-format ADD1 must have ne[3] == 1")
    else:
        if not (b.type == F32 or b.type == a.type):
            fail(node, f"src1 must be F32 or src0's type, not {b.traits.name}")
        _plain(node, (node, "dst"), (a, "src0"))


@validates(Op.TRI)
def check_tri(node: Node) -> None:
    """TRI (ggml_tri): keeps one triangle of each square matrix, op_params[0] the kind (0
    upper with the diagonal, 1 strictly upper, 2 lower with the diagonal, 3 strictly lower);
    F32, src0 contiguous: raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {F32})
    require(is_contiguous(a), node, "src0 must be contiguous")
    same_shape(node, a, node, "dst and src0")
    require(a.ne[0] == a.ne[1], node, "matrices must be square (ne[0] == ne[1])")
    kind = node.param_i32(0)
    if not (0 <= kind <= 3):
        fail(node, f"unknown triangle kind {kind}")


@validates(Op.DIAG)
def check_diag(node: Node) -> None:
    """DIAG (ggml_diag): each row of src0 (ne[1] == 1) becomes the diagonal of a square
    matrix; F32: raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {F32})
    require(a.ne[1] == 1, node, "src0 must have ne[1] == 1")
    expect = (a.ne[0], a.ne[0], a.ne[2], a.ne[3])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")


@validates(Op.DIAG_MASK_INF, Op.DIAG_MASK_ZERO)
def check_diag_mask(node: Node) -> None:
    """DIAG_MASK_INF and DIAG_MASK_ZERO: src0 with every element past column n_past + row
    (op_params[0], >= 0) set to -inf or 0; F32, dst and src0 contiguous, one shape: raise
    GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {F32})
    for t, what in ((node, "dst"), (a, "src0")):
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    same_shape(node, a, node, "dst and src0")
    if not (node.param_i32(0) >= 0):
        fail(node, f"n_past must be >= 0, got {node.param_i32(0)}")


def arange_steps(start: float, stop: float, step: float) -> int | None:
    """ggml_arange's element count ``ceil((stop - start) / step)`` in float32, or None where
    ggml would not build the node (stop <= start, a non-finite count)."""
    with np.errstate(all="ignore"):
        q = np.float32(np.float32(stop) - np.float32(start)) / np.float32(step)
        n = np.ceil(np.float32(q))
    if not (stop > start) or not math.isfinite(float(n)):
        return None
    return int(n)


@validates(Op.ARANGE)
def check_arange(node: Node) -> None:
    """ARANGE (ggml_arange): start, stop, step in op_params[0..2] (floats); F32 dst of
    ``ceil((stop - start) / step)`` contiguous elements, no sources: raise GraphInvalid unless
    ggml would accept the node."""
    no_src_beyond(node, 0)
    type_in(node, {F32}, node, "dst")
    _plain(node, (node, "dst"))
    require(is_contiguous(node), node, "dst must be contiguous")
    start, stop, step = (node.param_f32(i) for i in range(3))
    n = arange_steps(start, stop, step)
    if not (n is not None and n == node.nelements):
        fail(node, f"arange({start}, {stop}, {step}) does not have {node.nelements} elements")


@validates(Op.TIMESTEP_EMBEDDING)
def check_timestep_embedding(node: Node) -> None:
    """TIMESTEP_EMBEDDING (ggml_timestep_embedding): dim and max_period in op_params[0], [1];
    src0 F32 timesteps (a vector), dst F32 of shape (dim, src0 ne[0]): raise GraphInvalid
    unless ggml would accept the node."""
    a = only_source(node, {F32})
    dim = node.param_i32(0)
    require(a.ne[1:] == (1, 1, 1), node, "timesteps must be a vector")
    if node.ne != (dim, a.ne[0], 1, 1):
        fail(node, f"dst shape must be [{dim}, {a.ne[0]}, 1, 1] (dim = op_params[0])")


def _view_params(node: Node) -> tuple[int, int, int, int]:
    return node.param_i32(0), node.param_i32(1), node.param_i32(2), node.param_i32(3)


def check_view_write(node: Node, a: Node, b: Node) -> None:
    """ACC's and SET's written region: src1's shape laid over dst (and src0) with the byte
    strides nb1, nb2, nb3 and the byte offset of op_params[0..3].  Every element of it must
    lie inside dst and src0, at a multiple of the element size, and no two elements may share
    a byte (llama.cpp #25764: negative or oversized values write outside dst; spec/hazards.md,
    H17)."""
    esize = a.traits.type_size
    nb1, nb2, nb3, offset = _view_params(node)
    strides = (esize, nb1, nb2, nb3)
    if min(nb1, nb2, nb3, offset) < 0:
        fail(node, f"view strides {[nb1, nb2, nb3]} and offset {offset} must not be negative")
    if any(s % esize for s in strides) or offset % esize:
        fail(node, f"view strides {[nb1, nb2, nb3]} and offset {offset} must be multiples of "
                   f"the element size {esize}")
    if b.nelements == 0:
        return
    # dims in increasing stride: each must step past everything the smaller ones cover
    span = 0
    for s, n in sorted((s, n) for s, n in zip(strides, b.ne) if n > 1):
        if not (s >= span + esize):
            fail(node, f"the view {list(b.ne)} with strides {list(strides)} "
                       f"writes some bytes twice")
        span += (n - 1) * s
    end = offset + span + esize
    for t, what in ((node, "dst"), (a, "src0")):
        if not (end <= t.nbytes):
            fail(node, f"the view ends at byte {end}, past {what}'s "
                       f"{t.nbytes} bytes")


@validates(Op.ACC, Op.SET)
def check_acc_set(node: Node) -> None:
    """ACC (ggml_acc): dst = src0 with src1 added into a view of it; SET (ggml_set): dst =
    src0 with a view of it replaced by src1.  op_params = nb1, nb2, nb3, offset (bytes, of the
    view) and inplace (when set, src0 is not copied into dst first).  ACC: F32 throughout;
    SET: F32 or I32, src1 of dst's type; dst and src0 contiguous, one shape: raise
    GraphInvalid unless ggml would accept the node and the view lies inside dst."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    types = {F32} if node.op == Op.ACC else {F32, I32}
    for t, what in ((node, "dst"), (a, "src0"), (b, "src1")):
        type_in(t, types, node, what)
    require(a.type == node.type and b.type == node.type, node, "dst, src0 and src1 must share a type")
    _plain(node, (node, "dst"), (a, "src0"), (b, "src1"))
    for t, what in ((node, "dst"), (a, "src0")):
        if not is_contiguous(t):
            fail(node, f"{what} must be contiguous")
    same_shape(node, a, node, "dst and src0")
    require(b.nelements <= a.nelements, node, "src1 has more elements than src0")
    check_view_write(node, a, b)
