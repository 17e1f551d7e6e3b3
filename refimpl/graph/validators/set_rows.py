"""What ggml accepts for the ops of :mod:`refimpl.kernels.set_rows` (validation, any device)."""

from __future__ import annotations

from ..build import Node
from ..checks import (
    BF16,
    F16,
    F32,
    I32,
    I64,
    block_rows,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates
from .types import QUANTIZE_TYPES

_DST_TYPES = {F32, F16, BF16} | QUANTIZE_TYPES


@validates(Op.SET_ROWS)
def check_set_rows(node: Node) -> None:
    """SET_ROWS (ggml_set_rows): raise GraphInvalid unless ggml would accept the node."""
    b = src(node, 0, "rows")
    c = src(node, 1, "indices")
    no_src_beyond(node, 3)
    type_in(node, _DST_TYPES, node, "dst")
    type_in(b, {F32, F16}, node, "src0")
    type_in(c, {I32, I64}, node, "src1")
    for t, what in ((b, "src0"), (c, "src1")):
        elementwise_strides(t, node, what)
    block_rows(node, node, "dst")            # plain types: element-aligned strides too
    if node.ne[0] % node.traits.block_size != 0:
        fail(node, f"dst rows of {node.ne[0]} values are not whole {node.traits.name} blocks")
    require(b.nb[0] == b.traits.type_size, node, "src0 rows must be packed (nb[0])")
    if b.ne[0] != node.ne[0]:
        fail(node, f"src0 rows have {b.ne[0]} elements, dst rows {node.ne[0]}")
    if not (b.ne[2] == node.ne[2] and b.ne[3] == node.ne[3]):
        fail(node, f"src0 {list(b.ne)} and dst {list(node.ne)} differ in dimensions 2 and 3")
    if c.ne[0] != b.ne[1]:
        fail(node, f"src1 has {c.ne[0]} indices per row group, src0 has "
                   f"{b.ne[1]} rows")
    if not (c.ne[1] > 0 and b.ne[2] % c.ne[1] == 0):
        fail(node, f"src1 ne[1]={c.ne[1]} does not divide src0 ne[2]={b.ne[2]}")
    if not (c.ne[2] > 0 and b.ne[3] % c.ne[2] == 0):
        fail(node, f"src1 ne[2]={c.ne[2]} does not divide src0 ne[3]={b.ne[3]}")
    if c.ne[3] != 1:
        fail(node, f"src1 ne[3]={c.ne[3]} must be 1")
    a = node.src[2] if len(node.src) > 2 else None
    if a is not None:
        a = src(node, 2, "destination")
        if (a.type != node.type or a.ne != node.ne or a.nb != node.nb
                or a.buffer is not node.buffer or a.offset != node.offset):
            fail(node, f"dst is not a view of src2 '{a.name}' (same type, shape, strides "
                       f"and bytes)")
