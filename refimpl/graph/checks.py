"""Validation helpers shared by the op implementations (spec/graph-ops.md, "Common rules").

Each helper raises GraphInvalid with a sentence naming the node and the rule it breaks.
"""

from __future__ import annotations

from ..protocol.ggml_types import GgmlType
from .build import GraphInvalid, Node

F32, F16, BF16, I32, I64 = GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.I32, GgmlType.I64
FLOAT_TYPES = frozenset({F32, F16, BF16})


def fail(node: Node, rule: str):
    """Raise GraphInvalid for ``node`` breaking ``rule``."""
    raise GraphInvalid(f"node {node.describe()}: {rule}")


def require(cond: bool, node: Node, rule: str) -> None:
    """Raise unless ``cond``."""
    if not cond:
        fail(node, rule)


def src(node: Node, i: int, what: str = "") -> Node:
    """``node.src[i]``, which must be present and placed."""
    s = node.src[i] if i < len(node.src) else None
    if s is None:
        fail(node, f"src[{i}]{' (' + what + ')' if what else ''} is missing")
    if s.buffer is None:
        fail(node, f"src[{i}] '{s.name}' has no buffer on this server")
    return s


def no_src_beyond(node: Node, n: int) -> None:
    """Sources at index ``n`` and above must be absent."""
    for i in range(n, len(node.src)):
        if node.src[i] is not None:
            fail(node, f"unexpected src[{i}]")


def type_in(t: Node, types, node: Node, what: str) -> None:
    """``t.type`` must be one of ``types``."""
    if t.type not in types:
        names = ", ".join(GgmlType(x).name for x in sorted(types))
        fail(node, f"{what} has type {t.traits.name}; supported: {names}")


def elementwise_strides(t: Node, node: Node, what: str) -> None:
    """A plain-typed tensor read or written element by element: every stride and the data
    offset are multiples of the element size (so typed views are exact)."""
    size = t.traits.type_size
    if t.traits.block_size != 1:
        fail(node, f"{what} must have a plain element type, not {t.traits.name}")
    nb0, nb1, nb2, nb3 = t.nb
    if t.offset % size or nb0 % size or nb1 % size or nb2 % size or nb3 % size:
        fail(node, f"{what} '{t.name}' has strides {list(t.nb)} or offset {t.offset} that are not "
                   f"multiples of its element size {size}")


def block_rows(t: Node, node: Node, what: str) -> None:
    """A tensor read row by row: elements of a row are packed (nb[0] is the block size in
    bytes), and rows start at multiples of the block size in bytes."""
    tr = t.traits
    if t.nb[0] != tr.type_size:
        fail(node, f"{what} '{t.name}' rows are not packed (nb[0]={t.nb[0]}, expected {tr.type_size})")
    if tr.block_size == 1:
        elementwise_strides(t, node, what)


def only_source(node: Node, types) -> Node:
    """src0 of a node that has no other source, with dst and src0 of ``types`` and their
    strides element-aligned (:func:`elementwise_strides`)."""
    a = src(node, 0)
    no_src_beyond(node, 1)
    for t, what in ((node, "dst"), (a, "src0")):
        type_in(t, types, node, what)
        elementwise_strides(t, node, what)
    return a


def same_shape(a: Node, b: Node, node: Node, what: str) -> None:
    """``a`` and ``b`` have equal ``ne``."""
    if a.ne != b.ne:
        fail(node, f"{what}: shapes {list(a.ne)} and {list(b.ne)} differ")


def can_repeat(small: Node, big: Node) -> bool:
    """ggml_can_repeat: ``small`` tiles ``big`` exactly (each dimension divides)."""
    if small.nelements == 0:
        return big.nelements == 0
    return all(b % s == 0 for s, b in zip(small.ne, big.ne))


def is_contiguous(t: Node) -> bool:
    """Packed row-major storage with no gaps (ggml_is_contiguous)."""
    tr = t.traits
    expected = tr.type_size
    if t.nb[0] != expected:
        return False
    expected = tr.type_size * (t.ne[0] // tr.block_size)
    for i in range(1, 4):
        if t.ne[i] != 1 and t.nb[i] != expected:
            return False
        expected *= t.ne[i]
    return True


def overlaps(a: Node | None, b: Node | None) -> bool:
    """Whether two tensors' byte spans share a byte (a kernel writing one while reading the
    other in place would then see its own writes)."""
    if a is None or b is None or a.buffer is None or b.buffer is None:
        return False
    if a.buffer.memory is not b.buffer.memory or not a.nbytes or not b.nbytes:
        return False
    return a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes

