"""Rebuild a GRAPH_COMPUTE payload into checked nodes (spec/graph.md, "Checks").

Nothing here recurses: references are resolved through a dictionary in two flat passes, so a
graph of any depth costs the same stack.  Every tensor with a buffer is placed (its bytes lie
inside a live buffer of this connection and of the graph's device) before any op looks at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from ..buffers import AllocatedBuffer, BufferTable, Rejected
from ..protocol.constants import MAX_SRC
from ..protocol.ggml_types import type_traits
from ..protocol.messages import GraphComputeRequest
from ..protocol.profiles import LATEST, Profile
from ..protocol.ggml_types import TYPE_COUNT
from ..protocol.tensor import tensor_nbytes, tensor_problem_of
from .ops import FUNCTION_POINTER_OPS, OP_COUNT, VIEW_OPS, Op, WireOps, op_name, wire_ops


class GraphInvalid(Rejected):
    """A graph the server refuses to run (invalid, or outside what it implements)."""


@dataclass
class GraphLimits:
    """Bounds on what one GRAPH_COMPUTE may ask for."""

    max_nodes: int = 1 << 18
    max_tensors: int = 1 << 20


#: What one rebuilt tensor costs in server memory, about (a Node and its fields).  The
#: network layer charges it against the server's memory budget while a graph is decoded,
#: run and stored (docs/limits.md).
NODE_COST = 1024


@dataclass(eq=False)
class Node:
    """One tensor of a graph, with its references resolved and its bytes located."""

    id: int
    op: int
    type: int
    ne: tuple
    nb: tuple
    op_params: np.ndarray  # int32[16]
    flags: int
    name: str
    buffer: AllocatedBuffer | None
    offset: int            # byte offset of element 0 inside ``buffer`` (0 without a buffer)
    nbytes: int
    view_offs: int
    src_ids: tuple
    view_src_id: int
    src: list = field(default_factory=list)   # Node | None, MAX_SRC entries
    view_src: "Node | None" = None
    order: int = -1        # position in the node list; -1 for inputs
    #: numpy views of this tensor's bytes, by dtype, made once (refimpl.kernels.cpu_tensors);
    #: a bound graph lives no longer than its buffers, so they stay valid
    views: dict = field(default_factory=dict, repr=False, compare=False)
    #: type geometry (block size, bytes per block), looked up once
    traits: object = field(default=None, repr=False, compare=False)

    @property
    def is_node(self) -> bool:
        """True when the graph computes this tensor; False for inputs (leaves)."""
        return self.order >= 0

    @property
    def nelements(self) -> int:
        """Number of elements."""
        return self.ne[0] * self.ne[1] * self.ne[2] * self.ne[3]

    def param_i32(self, i: int) -> int:
        """``op_params[i]`` as a signed 32-bit integer."""
        return int(self.op_params[i])

    def param_f32(self, i: int) -> float:
        """``op_params[i]`` reinterpreted as a 32-bit float (how ggml stores float params)."""
        return float(self.op_params[i:i + 1].view(np.float32)[0])

    def describe(self) -> str:
        """Short text for log lines."""
        return f"{op_name(self.op)} '{self.name}' ({self.traits.name if self.traits else self.type}, ne={list(self.ne)})"


@dataclass
class Graph:
    """A rebuilt graph: nodes in execution order, every tensor by id."""

    device: int
    nodes: list[Node]
    tensors: dict[int, Node]


def build_graph(req: GraphComputeRequest, buffers: BufferTable,
                limits: GraphLimits = GraphLimits(), profile: Profile = LATEST) -> Graph:
    """Decode, resolve and place a graph; raises GraphInvalid on anything wrong.

    Op numbers are read with ``profile``'s op table (spec/versions.md, "Op numbering") and
    held as this package's :class:`Op` values from then on.
    """
    mapping = wire_ops(profile)
    n_nodes, n_tensors = len(req.nodes), len(req.tensors)
    if n_nodes == 0:
        raise GraphInvalid("graph has no nodes")
    if n_nodes > limits.max_nodes or n_tensors > limits.max_tensors:
        raise GraphInvalid(f"graph of {n_nodes} nodes and {n_tensors} tensors exceeds the limits "
                           f"({limits.max_nodes} nodes, {limits.max_tensors} tensors)")
    columns = _Columns(req.tensors)
    ids = set(columns.lists[0])
    if 0 in ids:
        raise GraphInvalid("a graph tensor has id 0")
    if len(ids) != n_tensors:
        raise GraphInvalid("two graph tensors share one id")

    tensors: dict[int, Node] = {}
    places: dict[int, tuple] = {}    # buffer handle -> (buffer, base, end), checked once
    for row in columns.rows():
        node = _make_node(*row, buffers, req.device, places)
        if mapping is not None:
            _map_op(node, mapping)
        tensors[node.id] = node

    # Second pass: link references (no recursion, whatever the depth).
    find = tensors.get        # id 0, "no source", is never a key: it finds None
    for node in tensors.values():
        links = list(map(find, node.src_ids))
        if links.count(None) != node.src_ids.count(0):
            s = next(s for s, t in zip(node.src_ids, links) if s and t is None)
            raise GraphInvalid(f"tensor '{node.name}' names source id {s:#x}, which the graph "
                               f"does not contain")
        node.src = links
        if node.view_src_id:
            node.view_src = tensors.get(node.view_src_id)
            if node.view_src is None:
                raise GraphInvalid(f"tensor '{node.name}' is a view of id {node.view_src_id:#x}, "
                                   f"which the graph does not contain")

    nodes: list[Node] = []
    for position, nid in enumerate(req.nodes.tolist()):
        node = tensors.get(nid)
        if node is None:
            raise GraphInvalid(f"graph node {position} (id {nid:#x}) is not among the tensors")
        if node.is_node:
            raise GraphInvalid(f"tensor '{node.name}' appears twice in the node list")
        node.order = position
        nodes.append(node)

    for node in nodes:
        _check_node_references(node)
    return Graph(req.device, nodes, tensors)


class _Columns:
    """The decoded ``rpc_tensor`` records as Python values, converted a column at a time
    (reading a field of one numpy record at a time cost tens of microseconds a tensor, and a
    model's graph has over a thousand tensors)."""

    FIELDS = ("id", "type", "buffer", "ne", "nb", "op", "flags", "src", "view_src",
              "view_offs", "data", "name")

    def __init__(self, rec: np.ndarray):
        self.lists = [rec[f].tolist() for f in self.FIELDS]
        self.op_params = np.array(rec["op_params"], dtype=np.int32)   # one copy, ours

    def rows(self):
        """Each tensor's fields in :data:`FIELDS` order, then its ``op_params`` (an int32
        row of the copy)."""
        return zip(*self.lists, self.op_params)


def _make_node(id_, type_, handle, ne, nb, op, flags, src, view_src, view_offs, data, name,
               op_params, buffers: BufferTable, device: int, places: dict) -> Node:
    """One graph tensor from its decoded fields (:class:`_Columns`), checked alone
    (spec/tensor.md, "Validity") and placed in its buffer; raises GraphInvalid.  ``places``
    keeps each buffer handle's lookup for the rest of the graph (:func:`_place`)."""
    ne = tuple(ne)
    nb = tuple(nb)
    name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    traits = type_traits(type_) if type_ < TYPE_COUNT else None
    if traits is None:
        raise GraphInvalid(f"graph tensor '{name}': {tensor_problem_of(type_, ne)}")
    if ne[0] % traits.block_size:
        raise GraphInvalid(f"graph tensor '{name}': {tensor_problem_of(type_, ne)}")
    nbytes = tensor_nbytes(type_, ne, nb, traits)
    buf, offset = None, 0
    if handle:
        place = places.get(handle)
        if place is None:
            place = places[handle] = _place(handle, buffers, device, name)
        buf, base, end = place
        if data < base or data + nbytes > end:
            raise GraphInvalid(f"graph tensor '{name}' spans [{data:#x}, {data + nbytes:#x}) outside "
                               f"its buffer [{base:#x}, {end:#x})")
        offset = data - base
    elif data:
        raise GraphInvalid(f"graph tensor '{name}' has a data address ({data:#x}) but no buffer")
    # positionally, in Node's field order (keywords cost as much again, per tensor)
    return Node(id_, op, type_, ne, nb, op_params, flags, name, buf, offset, nbytes, view_offs,
                tuple(src[:MAX_SRC]), view_src, [], None, -1, {}, traits)


def _place(handle: int, buffers: BufferTable, device: int, name: str) -> tuple:
    """``(buffer, base, end)`` of a live buffer of the graph's device (``name``: the first
    tensor that names it, for the message); raises GraphInvalid."""
    try:
        buf = buffers.get(handle)
    except Rejected as exc:
        raise GraphInvalid(f"graph tensor '{name}': {exc}") from None
    if buf.device_index != device:
        raise GraphInvalid(f"graph tensor '{name}' lives on device {buf.device_index}, the "
                           f"graph runs on device {device}")
    return buf, buf.base, buf.end


def _map_op(node: Node, mapping: WireOps) -> None:
    """Translate a node's wire op (and UNARY/GLU sub-op) numbers into :class:`Op` values."""
    wire = node.op
    op = mapping.ops[wire] if wire < len(mapping.ops) else -1
    if op < 0:
        raise GraphInvalid(f"graph tensor '{node.name}' has op {wire}, which protocol "
                           f"{mapping.version} does not define or this server does not know")
    node.op = op
    sub_table = mapping.unary if op == Op.UNARY else mapping.glu if op == Op.GLU else None
    if sub_table is not None:
        sub = int(node.op_params[0])
        mapped = sub_table[sub] if 0 <= sub < len(sub_table) else -1
        if mapped < 0:
            raise GraphInvalid(f"node '{node.name}' has {Op(op).name} sub-op {sub}, which "
                               f"protocol {mapping.version} does not define")
        node.op_params[0] = mapped


def _check_node_references(node: Node) -> None:
    op = node.op
    if op >= OP_COUNT:
        raise GraphInvalid(f"node '{node.name}' has unknown op {op}")
    if op in FUNCTION_POINTER_OPS:
        raise GraphInvalid(f"node '{node.name}' is {op_name(op)}, an op that carries a "
                           f"function pointer of the client; such ops are never run")
    is_view = op in VIEW_OPS
    # a view without bytes here (graph-ops.md, Views) is checked by the view validator
    if node.buffer is None and not (is_view and op != Op.NONE and node.view_src_id):
        raise GraphInvalid(f"node {node.describe()} has no buffer to hold its result")
    if not is_view:
        # A computed node's elements occupy distinct bytes of its buffer: ggml never writes a
        # result over itself, and the bound keeps a node's work proportional to the memory
        # it was given (zero strides could otherwise fold 2^40 elements into 64 bytes).
        tr = node.traits
        payload = node.ne[0] // tr.block_size * tr.type_size * node.ne[1] * node.ne[2] * node.ne[3]
        if payload > node.nbytes:
            raise GraphInvalid(f"node {node.describe()} has {payload} bytes of elements in a span "
                               f"of {node.nbytes} bytes (strides {list(node.nb)} overlap)")
    order = node.order          # a source computed here or later has an order >= it; inputs -1
    for i, s in enumerate(node.src):
        if s is None:
            continue
        if s is node:
            # ggml_cast() makes a CPY whose destination operand src[1] is the node itself (a
            # fresh tensor, not a view); that is the one self-reference ggml builds
            # (spec/graph.md, "Rebuilding the graph").
            if op == Op.CPY and i == 1:
                continue
            raise GraphInvalid(f"node '{node.name}' uses itself as a source")
        if s.order >= order:
            raise GraphInvalid(f"node '{node.name}' uses '{s.name}', which is computed later "
                               f"(a cycle or a misordered graph)")
        if not is_view and s.buffer is None:
            raise GraphInvalid(f"node '{node.name}' reads src[{i}] '{s.name}', which has no "
                               f"buffer on this server")
    s = node.view_src
    if s is node:
        raise GraphInvalid(f"node '{node.name}' uses itself as a source")
    if s is not None and s.order >= order:
        raise GraphInvalid(f"node '{node.name}' uses '{s.name}', which is computed later "
                           f"(a cycle or a misordered graph)")
