"""What ggml accepts for the ops of :mod:`refimpl.kernels.copy` (validation, any device)."""

from __future__ import annotations

from ...protocol.ggml_types import GgmlType
from ..build import Node
from ..checks import (block_rows, elementwise_strides, fail, is_contiguous, no_src_beyond,
                      require, src)
from ..ops import Op
from ..registry import validates
from .types import QUANT_WEIGHT_TYPES, QUANTIZE_TYPES

_FLOATS = {GgmlType.F32, GgmlType.F16, GgmlType.BF16}
_PLAIN = _FLOATS | {GgmlType.I32, GgmlType.I16, GgmlType.I8, GgmlType.I64, GgmlType.F64}


@validates(Op.CPY, Op.CONT, Op.DUP)
def check_copy_ops(node: Node) -> None:
    """CPY (src0 into the layout of src1, dst aliases src1), CONT and DUP (fresh copies): raise
    GraphInvalid unless ggml would accept the node."""
    a = src(node, 0)
    if node.op == Op.CPY:
        b = src(node, 1)
        no_src_beyond(node, 2)
        require(node.type == b.type and node.ne == b.ne, node,
                "CPY's dst must describe src1 (same type and shape)")
    else:
        no_src_beyond(node, 1)
        if node.type != a.type:
            fail(node, f"{Op(node.op).name} keeps the type")
    if node.nelements != a.nelements:
        fail(node, f"src0 has {a.nelements} elements, dst {node.nelements}")
    if a.type == node.type and a.type not in _PLAIN:
        block_rows(a, node, "src0")
        block_rows(node, node, "dst")
        require(a.ne[0] == node.ne[0], node, "block copies need equal row lengths")
        return
    if a.type in QUANT_WEIGHT_TYPES and node.type in _FLOATS:
        block_rows(a, node, "src0")
        elementwise_strides(node, node, "dst")
        return
    if node.type in QUANTIZE_TYPES and a.type in _FLOATS:
        # ggml quantises src0's rows one after the other into a contiguous dst
        elementwise_strides(a, node, "src0")
        require(a.nb[0] == a.traits.type_size, node, "src0 rows must be packed (nb[0])")
        require(is_contiguous(node), node, "a quantised dst must be contiguous")
        if a.ne[0] % node.traits.block_size != 0:
            fail(node, f"src0 rows of {a.ne[0]} values are not whole {node.traits.name} blocks")
        return
    for t, what in ((a, "src0"), (node, "dst")):
        if t.type not in _PLAIN:
            fail(node, f"{what} type {t.traits.name}: conversions to or from block types "
                       f"are not implemented")
        elementwise_strides(t, node, what)
    ok = a.type == node.type or (a.type in _FLOATS and node.type in _FLOATS) or \
        {a.type, node.type} == {GgmlType.I32, GgmlType.F32}
    if not ok:
        fail(node, f"no conversion from {a.traits.name} to {node.traits.name}")
