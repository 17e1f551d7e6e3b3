"""What ggml accepts for the ops of :mod:`refimpl.kernels.reduce`: SUM_ROWS, SUM, MEAN, CUMSUM,
ARGMAX, COUNT_EQUAL (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (F32, FLOAT_TYPES, I32, I64, elementwise_strides, fail, no_src_beyond,
                      only_source, require, src, type_in)
from ..ops import Op
from ..registry import validates


@validates(Op.SUM_ROWS)
def check_sum_rows(node: Node) -> None:
    """SUM_ROWS (ggml_sum_rows): ``dst[0, i1, i2, i3] = Σ src0[:, i1, i2, i3]``; F32 only (the
    CPU backend aborts on any other type): raise GraphInvalid unless ggml would accept the
    node."""
    a = only_source(node, {F32})
    expect = (1, *a.ne[1:])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")


def _packed_rows(t: Node, node: Node, what: str) -> None:
    """ggml-cpu's kernels read each row as packed elements from its first (``nb[0]`` is not
    used), so a row must be packed to mean what it says."""
    if t.nb[0] != t.traits.type_size:
        fail(node, f"{what} rows must be packed "
                   f"(nb[0] = {t.traits.type_size})")


def _rows_read_packed(t: Node, node: Node, what: str) -> None:
    """SUM, MEAN and ARGMAX read each row of ``t`` as ``ne[0]`` packed elements from its first,
    as ggml-cpu does whatever ``nb[0]`` says (spec/ops/elementwise.md).  With ``nb[0]`` at
    least the element size those reads stay inside the tensor's own bytes (the last row's
    read ends at or before its last element's end)."""
    if not (t.ne[0] <= 1 or t.nb[0] >= t.traits.type_size):
        fail(node, f"{what} nb[0] = {t.nb[0]} is below the element size {t.traits.type_size}")


@validates(Op.SUM)
def check_sum(node: Node) -> None:
    """SUM (ggml_sum): the sum of every element of src0 into a one-element dst of src0's
    type; F32, F16 or BF16, rows read packed: raise GraphInvalid unless ggml would accept the
    node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    type_in(a, FLOAT_TYPES, node, "src0")
    require(node.type == a.type, node, "dst must have src0's type")
    for t, what in ((node, "dst"), (a, "src0")):
        elementwise_strides(t, node, what)
    _rows_read_packed(a, node, "src0")
    require(node.ne == (1, 1, 1, 1), node, "dst must hold one element")


@validates(Op.MEAN)
def check_mean(node: Node) -> None:
    """MEAN (ggml_mean): the mean of each row; F32, rows of src0 read packed, dst shape (1, ne[1],
    ne[2], ne[3]): raise GraphInvalid unless ggml would accept the node."""
    a = only_source(node, {F32})
    _rows_read_packed(a, node, "src0")
    expect = (1, *a.ne[1:])
    if node.ne != expect:
        fail(node, f"dst shape must be {list(expect)}")


@validates(Op.CUMSUM)
def check_cumsum(node: Node) -> None:
    """CUMSUM (ggml_cumsum): running sums along each row; F32, dst of src0's shape, rows of
    both packed (ggml-cpu asserts it): raise GraphInvalid unless ggml would accept the
    node."""
    a = only_source(node, {F32})
    for t, what in ((node, "dst"), (a, "src0")):
        _packed_rows(t, node, what)
    require(node.ne == a.ne, node, "dst must have src0's shape")


@validates(Op.ARGMAX)
def check_argmax(node: Node) -> None:
    """ARGMAX (ggml_argmax): the index of each row's largest value; src0 an F32 matrix, rows
    read packed, of at most INT32_MAX elements, dst I32 of shape (src0 ne[1]): raise
    GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    type_in(a, {F32}, node, "src0")
    type_in(node, {I32}, node, "dst")
    for t, what in ((node, "dst"), (a, "src0")):
        elementwise_strides(t, node, what)
    _rows_read_packed(a, node, "src0")
    require(a.ne[2] == 1 and a.ne[3] == 1, node, "src0 must be a matrix")
    require(a.ne[0] <= 2**31 - 1, node, "rows longer than INT32_MAX")
    if node.ne != (a.ne[1], 1, 1, 1):
        fail(node, f"dst shape must be [{a.ne[1]}, 1, 1, 1]")


@validates(Op.COUNT_EQUAL)
def check_count_equal(node: Node) -> None:
    """COUNT_EQUAL (ggml_count_equal): how many elements of src0 and src1 (I32, one shape)
    are equal, into a one-element I64 dst: raise GraphInvalid unless ggml would accept the
    node."""
    a, b = src(node, 0), src(node, 1)
    no_src_beyond(node, 2)
    for t, what in ((a, "src0"), (b, "src1")):
        type_in(t, {I32}, node, what)
    type_in(node, {I64}, node, "dst")
    for t, what in ((node, "dst"), (a, "src0"), (b, "src1")):
        elementwise_strides(t, node, what)
    require(a.ne == b.ne, node, "src0 and src1 must have one shape")
    require(node.ne == (1, 1, 1, 1), node, "dst must hold one element")
