"""Hypothesis strategies for near-valid and hostile input of protocol 7.0.0 (the fuzz campaigns).

``strategies.py`` draws *valid encodings*.  This module draws what a server meets from a
careless or malicious client, relative to the buffers a fuzz example really allocated (an
:class:`Arena`), so that most messages hit live handles and real addresses:

* **valid** requests: every command, with tensors placed inside live buffers and regions
  inside their tensors;
* **near-valid** requests: a valid request with exactly one field off: a size, type, dimension,
  stride, offset, handle, device index or count (:func:`mutate_tensor` and the per-command
  mutations);
* **hostile** requests: random command bytes, lying length prefixes, truncated frames, a
  second HELLO, fully random tensors, and graphs built to hurt (cycles, id 0, duplicate ids,
  function-pointer ops, unknown ops, zero strides, deep chains, buffer-less tensors);
* **graphs** of every op the server implements, shaped as ggml would shape them, optionally
  with one field off.

Each strategy yields :class:`Frame` objects: the bytes to send and what a conforming server
may answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hypothesis import strategies as st

from refimpl.graph.ops import FUNCTION_POINTER_OPS, OP_COUNT, GluOp, Op, UnaryOp, op_name
from refimpl.protocol import messages as m
from refimpl.protocol.constants import COMMAND_LIMIT, CONN_CAPS_SIZE, Command
from refimpl.protocol.ggml_types import REMOVED_TYPES, TYPE_COUNT, GgmlType, type_traits
from refimpl.protocol.messages import SET_TENSOR_HEADER_SIZE
from refimpl.protocol.tensor import RPC_TENSOR_SIZE, RpcTensor, contiguous_strides, tensor_nbytes
from .strategies import rpc_tensors

F32, F16, BF16, I32, I64 = GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.I32, GgmlType.I64
Q4_0, Q8_0, I8 = GgmlType.Q4_0, GgmlType.Q8_0, GgmlType.I8
FLAG_COMPUTE = 16

#: Types a valid tensor is drawn from (plain types and a few block formats).
VALID_TYPES = (F32, F16, BF16, I8, GgmlType.I16, I32, I64, Q4_0, Q8_0, GgmlType.Q4_K,
               GgmlType.Q6_K)
#: Interesting integers for u32 and u64 fields.
U32_EDGES = (0, 1, 2, 3, 31, 32, 255, 256, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
U64_EDGES = (0, 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1)


@dataclass(frozen=True)
class Arena:
    """What a fuzz example has on the server: live buffers as ``(handle, base, size)``, and
    handles that were freed (dead)."""

    buffers: tuple
    dead: tuple = ()
    device_count: int = 1


@dataclass(frozen=True)
class Frame:
    """One request as bytes, and what a conforming server may answer.

    ``length`` overrides the length prefix (a lie about the payload); ``truncate`` sends only
    the first bytes.  A frame that is not ``well_formed`` ends its example: the server must
    close the connection (or wait for bytes that never come, until the client closes).
    """

    command: int
    payload: bytes = b""
    length: int | None = None
    truncate: int | None = None
    label: str = ""

    def encode(self) -> bytes:
        """The bytes to send."""
        n = len(self.payload) if self.length is None else self.length
        data = struct.pack("<BQ", self.command & 0xFF, n) + self.payload
        return data if self.truncate is None else data[:self.truncate]

    @property
    def well_formed(self) -> bool:
        """A known command (not HELLO) whose length prefix tells the truth and whose payload
        has the size the command requires."""
        if self.truncate is not None or self.length not in (None, len(self.payload)):
            return False
        if not 0 <= self.command < COMMAND_LIMIT or self.command == Command.HELLO:
            return False
        cls = m.REQUESTS[Command(self.command)]
        if issubclass(cls, m.FixedMessage):
            return len(self.payload) == cls.payload_size()
        if self.command == Command.SET_TENSOR:
            return len(self.payload) >= SET_TENSOR_HEADER_SIZE
        try:
            m.GraphComputeRequest.decode_payload(self.payload)
        except Exception:
            return False
        return True

    def reply_size(self) -> int | None:
        """Bytes of the reply a conforming server sends if it accepts the request (length
        prefix included), or None for commands without a reply."""
        cmd = Command(self.command)
        if not m.has_response(cmd):
            return None
        if cmd is Command.GET_TENSOR:
            return 8 + struct.unpack_from("<Q", self.payload, RPC_TENSOR_SIZE + 8)[0]
        return 8 + m.RESPONSES[cmd].payload_size()


def frame_of(req: m.Message, label: str = "") -> Frame:
    """A truthful frame of a typed request."""
    return Frame(int(req.COMMAND), req.encode_payload(), label=label or req.COMMAND.name)


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------

ids = st.integers(1, 64)


@st.composite
def placed_tensors(draw, arena: Arena, types=VALID_TYPES, max_rows: int = 4):
    """A valid tensor: a type, a small shape, contiguous strides, inside a live buffer."""
    handle, base, size = draw(st.sampled_from([b for b in arena.buffers if b[2] > 0]
                                              or list(arena.buffers)))
    if size == 0:  # only empty buffers: an empty tensor at their base
        return RpcTensor(id=draw(ids), type=I8, buffer=handle, ne=(0, 1, 1, 1), nb=(1, 0, 0, 0),
                         data=base)
    type_ = draw(st.sampled_from(types))
    tr = type_traits(type_)
    ne = [tr.block_size * draw(st.integers(1, 4)), draw(st.integers(1, max_rows)),
          draw(st.integers(1, 2)), 1]
    while True:
        nb = contiguous_strides(type_, ne)
        nbytes = tensor_nbytes(type_, ne, nb)
        if nbytes <= size or ne == [tr.block_size, 1, 1, 1]:
            break
        ne = [tr.block_size, max(1, ne[1] // 2), 1, 1] if ne[1] > 1 or ne[2] > 1 else \
            [tr.block_size, 1, 1, 1]
    if nbytes > size:  # even one block does not fit: use I8
        type_, ne, nb, nbytes = I8, [1, 1, 1, 1], (1, 1, 1, 1), 1
    align = tr.type_size if tr.block_size == 1 else 1
    offset = draw(st.integers(0, (size - nbytes) // align)) * align
    return RpcTensor(id=draw(ids), type=type_, buffer=handle, ne=tuple(ne), nb=tuple(nb),
                     data=base + offset)


def _replace(t: RpcTensor, **kw) -> RpcTensor:
    fields = {f: getattr(t, f) for f in RpcTensor.__dataclass_fields__}
    fields.update(kw)
    return RpcTensor(**fields)


@st.composite
def mutate_tensor(draw, t: RpcTensor, arena: Arena):
    """``t`` with exactly one field off: type, a dimension, a stride, data, buffer, op, src."""
    what = draw(st.sampled_from(["type", "ne", "nb", "data", "buffer", "graph-fields"]))
    if what == "type":
        new = draw(st.sampled_from((TYPE_COUNT, 0x100, 0xFFFFFFFF, *sorted(REMOVED_TYPES),
                                    *VALID_TYPES)))
        return _replace(t, type=new), f"type={new}"
    if what in ("ne", "nb"):
        i = draw(st.integers(0, 3))
        old = getattr(t, what)
        value = draw(st.sampled_from((0, old[i] + 1, max(old[i] - 1, 0), old[i] * 2,
                                      old[i] * 65536 & 0xFFFFFFFF, *U32_EDGES)))
        new = tuple(value if j == i else x for j, x in enumerate(old))
        return _replace(t, **{what: new}), f"{what}[{i}]={value}"
    if what == "data":
        handle, base, size = next((b for b in arena.buffers if b[0] == t.buffer),
                                  arena.buffers[0])
        others = [b[1] for b in arena.buffers if b[0] != t.buffer]
        value = draw(st.sampled_from((base - 1, base + size, base + size - 1, t.data + 1, 0,
                                      2**64 - 1, *others) if base else (0, 1, 2**64 - 1)))
        return _replace(t, data=value % 2**64), f"data={value % 2**64:#x}"
    if what == "buffer":
        others = [b[0] for b in arena.buffers if b[0] != t.buffer]
        value = draw(st.sampled_from((0, t.buffer + 1, 2**64 - 1, *arena.dead, *others)))
        return _replace(t, buffer=value), f"buffer={value:#x}"
    field_ = draw(st.sampled_from(["op", "src", "view_src", "flags", "name"]))
    if field_ == "op":
        return _replace(t, op=draw(st.integers(0, 0xFFFF))), "op"
    if field_ == "src":
        return _replace(t, src=tuple(draw(st.lists(st.integers(0, 2**64 - 1), min_size=10,
                                                   max_size=10)))), "src"
    if field_ == "view_src":
        return _replace(t, view_src=draw(st.integers(0, 70)),
                        view_offs=draw(st.sampled_from(U64_EDGES))), "view_src"
    if field_ == "flags":
        return _replace(t, flags=draw(st.integers(-(2**31), 2**31 - 1))), "flags"
    return _replace(t, name=draw(st.binary(min_size=64, max_size=64))), "name"


# ----------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------

def _region(draw, t: RpcTensor):
    n = tensor_nbytes(t.type, t.ne, t.nb)
    offset = draw(st.integers(0, n))
    size = draw(st.integers(0, n - offset))
    return offset, size


@st.composite
def valid_requests(draw, arena: Arena):
    """A request a conforming server accepts (given the arena's buffers are live)."""
    kind = draw(st.sampled_from([
        "alloc", "alignment", "max_size", "memory", "count", "base", "clear", "set", "set_hash",
        "get", "copy", "init", "alloc_size", "memset", "free", "recompute"]))
    buf = draw(st.sampled_from(arena.buffers))
    if kind == "alloc":
        return frame_of(m.AllocBufferRequest(0, draw(st.sampled_from((0, 1, 64, 4096, 1 << 16)))))
    if kind == "alignment":
        return frame_of(m.GetAlignmentRequest(0))
    if kind == "max_size":
        return frame_of(m.GetMaxSizeRequest(0))
    if kind == "memory":
        return frame_of(m.GetDeviceMemoryRequest(0))
    if kind == "count":
        return frame_of(m.DeviceCountRequest())
    if kind == "base":
        return frame_of(m.BufferGetBaseRequest(buf[0]))
    if kind == "clear":
        return frame_of(m.BufferClearRequest(buf[0], draw(st.integers(0, 255))))
    if kind == "free":
        return frame_of(m.FreeBufferRequest(buf[0]))
    if kind == "recompute":
        return frame_of(m.GraphRecomputeRequest(0))
    t = draw(placed_tensors(arena))
    if kind == "set":
        offset, size = _region(draw, t)
        return frame_of(m.SetTensorRequest(t, offset, draw(st.binary(min_size=size, max_size=size)),
                                           draw(st.integers(0, 1))))
    if kind == "set_hash":
        return frame_of(m.SetTensorHashRequest(t, 0, draw(st.integers(0, 2**64 - 1))))
    if kind == "get":
        offset, size = _region(draw, t)
        return frame_of(m.GetTensorRequest(t, offset, size))
    if kind == "copy":
        dst = draw(placed_tensors(arena))
        return frame_of(m.CopyTensorRequest(t, dst), "COPY_TENSOR (may not fit)")
    if kind == "init":
        return frame_of(m.InitTensorRequest(t))
    if kind == "alloc_size":
        srcs = [draw(placed_tensors(arena)) for _ in range(draw(st.integers(0, 2)))]
        srcs += [RpcTensor()] * (10 - len(srcs))
        return frame_of(m.GetAllocSizeRequest(0, t, tuple(srcs)))
    offset, size = _region(draw, t)
    return frame_of(m.MemsetTensorRequest(t, offset, size, draw(st.integers(0, 255))))


@st.composite
def near_valid_requests(draw, arena: Arena):
    """A valid request with one field off."""
    kind = draw(st.sampled_from(["tensor", "region", "device", "alloc", "handle", "graph"]))
    if kind == "graph":
        return draw(graphs(arena, mutate=True))
    if kind == "device":
        dev = draw(st.sampled_from((arena.device_count, 2**31, 2**32 - 1)))
        req = draw(st.sampled_from([
            m.GetAlignmentRequest(dev), m.GetMaxSizeRequest(dev), m.GetDeviceMemoryRequest(dev),
            m.AllocBufferRequest(dev, 64), m.GraphRecomputeRequest(dev)]))
        return frame_of(req, f"{req.COMMAND.name} device={dev}")
    if kind == "alloc":
        size = draw(st.sampled_from((2**62, 2**63, 2**64 - 1, 1 << 40, (1 << 30) + 1)))
        return frame_of(m.AllocBufferRequest(0, size), f"ALLOC_BUFFER {size}")
    if kind == "handle":
        h = draw(st.sampled_from((0, 2**64 - 1, *arena.dead,
                                  *[b[0] + 1 for b in arena.buffers])))
        req = draw(st.sampled_from([m.BufferGetBaseRequest(h), m.FreeBufferRequest(h),
                                    m.BufferClearRequest(h, 7)]))
        return frame_of(req, f"{req.COMMAND.name} handle={h:#x}")
    t = draw(placed_tensors(arena))
    n = tensor_nbytes(t.type, t.ne, t.nb)
    if kind == "region":
        offset, size = draw(st.sampled_from([(n + 1, 0), (0, n + 1), (1, n), (n, 1),
                                             (2**64 - 1, 1), (1, 2**64 - 1), (2**63, 2**63)]))
        cmd = draw(st.sampled_from(["set", "get", "memset", "hash"]))
        if cmd == "set":
            size = min(size, n + 64)
            return frame_of(m.SetTensorRequest(t, offset, bytes(size)),
                            f"SET_TENSOR region ({offset}, {size}) of {n}")
        if cmd == "get":
            return frame_of(m.GetTensorRequest(t, offset, min(size, 1 << 20)),
                            f"GET_TENSOR region ({offset}, {size}) of {n}")
        if cmd == "hash":
            return frame_of(m.SetTensorHashRequest(t, offset, 0), f"SET_TENSOR_HASH offset {offset}")
        return frame_of(m.MemsetTensorRequest(t, offset, size, 1),
                        f"MEMSET_TENSOR region ({offset}, {size}) of {n}")
    bad, what = draw(mutate_tensor(t, arena))
    cmd = draw(st.sampled_from(["set", "get", "memset", "hash", "copy-src", "copy-dst", "init",
                                "alloc_size"]))
    if cmd == "set":
        return frame_of(m.SetTensorRequest(bad, 0, bytes(min(n, 4096))), f"SET_TENSOR {what}")
    if cmd == "get":
        return frame_of(m.GetTensorRequest(bad, 0, min(n, 4096)), f"GET_TENSOR {what}")
    if cmd == "memset":
        return frame_of(m.MemsetTensorRequest(bad, 0, n, 3), f"MEMSET_TENSOR {what}")
    if cmd == "hash":
        return frame_of(m.SetTensorHashRequest(bad, 0, 1), f"SET_TENSOR_HASH {what}")
    if cmd == "copy-src":
        return frame_of(m.CopyTensorRequest(bad, draw(placed_tensors(arena))), f"COPY_TENSOR src {what}")
    if cmd == "copy-dst":
        return frame_of(m.CopyTensorRequest(t, bad), f"COPY_TENSOR dst {what}")
    if cmd == "init":
        return frame_of(m.InitTensorRequest(bad), f"INIT_TENSOR {what}")
    srcs = (bad,) + (RpcTensor(),) * 9
    return frame_of(m.GetAllocSizeRequest(0, t, srcs), f"GET_ALLOC_SIZE src {what}")


@st.composite
def hostile_requests(draw, arena: Arena):
    """Requests no honest client sends."""
    kind = draw(st.sampled_from(["random", "length", "truncate", "hello", "unknown",
                                 "random-tensor", "graph"]))
    if kind == "graph":
        return draw(hostile_graphs(arena))
    if kind == "random":
        return Frame(draw(st.integers(0, 255)), draw(st.binary(max_size=400)), label="random bytes")
    if kind == "unknown":
        return Frame(draw(st.integers(COMMAND_LIMIT, 255)), draw(st.binary(max_size=16)),
                     label="unknown command")
    if kind == "hello":
        return Frame(int(Command.HELLO), bytes(CONN_CAPS_SIZE), label="second HELLO")
    if kind == "random-tensor":
        t = draw(rpc_tensors())
        cmd = draw(st.sampled_from(["set", "get", "init", "copy", "memset"]))
        if cmd == "set":
            return frame_of(m.SetTensorRequest(t, draw(st.sampled_from(U64_EDGES)),
                                               draw(st.binary(max_size=64))), "SET_TENSOR random")
        if cmd == "get":
            return frame_of(m.GetTensorRequest(t, draw(st.sampled_from(U64_EDGES)),
                                               draw(st.integers(0, 4096))), "GET_TENSOR random")
        if cmd == "init":
            return frame_of(m.InitTensorRequest(t), "INIT_TENSOR random")
        if cmd == "copy":
            return frame_of(m.CopyTensorRequest(t, draw(rpc_tensors())), "COPY_TENSOR random")
        return frame_of(m.MemsetTensorRequest(t, draw(st.sampled_from(U64_EDGES)),
                                              draw(st.sampled_from(U64_EDGES)), 0),
                        "MEMSET_TENSOR random")
    base = draw(valid_requests(arena))
    if kind == "length":
        lie = draw(st.sampled_from((0, 1, len(base.payload) - 1, len(base.payload) + 1,
                                    SET_TENSOR_HEADER_SIZE - 1, 2**31, 2**63, 2**64 - 1)))
        return Frame(base.command, base.payload, length=max(lie, 0) % 2**64,
                     label=f"{base.label} length prefix {lie}")
    cut = draw(st.integers(1, max(1, len(base.encode()) - 1)))
    return Frame(base.command, base.payload, truncate=cut, label=f"{base.label} cut at {cut}")


def requests(arena: Arena):
    """Any request: valid, near-valid or hostile."""
    return st.one_of(valid_requests(arena), near_valid_requests(arena), hostile_requests(arena))


# ----------------------------------------------------------------------------------------------
# graphs
# ----------------------------------------------------------------------------------------------

def f32_bits(x: float) -> int:
    """A float32 as the signed 32-bit integer ggml stores in op_params."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


_FLOATS = st.sampled_from((0.0, 1.0, -1.0, 0.5, 1e-5, 1e-6, 10000.0, 1e30, float("inf"),
                           float("nan"))).map(f32_bits)
_PARAM = st.one_of(st.integers(-4, 130), _FLOATS, st.sampled_from((-(2**31), 2**31 - 1)))
#: Mostly 0.0 (the common value of ALiBi's max_bias, softcap...), sometimes anything.
_MOSTLY_ZERO = st.one_of(st.just(0), st.just(0), st.just(0), _FLOATS)


@dataclass
class _GraphDraft:
    arena: Arena
    tensors: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    next_id: int = 1
    used: dict = field(default_factory=dict)  # buffer index -> bytes used

    def place(self, type_, ne, nb=None, **kw) -> RpcTensor | None:
        """A new tensor in the first buffer with room (None when none has)."""
        nb = nb or contiguous_strides(type_, ne)
        n = tensor_nbytes(type_, ne, nb)
        for i, (handle, base, size) in enumerate(self.arena.buffers):
            at = -(-self.used.get(i, 0) // 32) * 32
            if at + n <= size:
                self.used[i] = at + n
                t = RpcTensor(id=self.next_id, type=type_, buffer=handle, ne=tuple(ne),
                              nb=tuple(nb), data=base + at, **kw)
                self.next_id += 1
                self.tensors.append(t)
                return t
        return None


def _dims(draw, k=4):
    return [draw(st.integers(1, 4)) for _ in range(k)]


@st.composite
def graphs(draw, arena: Arena, mutate: bool = False):
    """A GRAPH_COMPUTE of one to three nodes of the ops refimpl implements, shaped as ggml
    shapes them (sometimes wrongly: ``mutate`` puts one field off)."""
    g = _GraphDraft(arena)
    for _ in range(draw(st.integers(1, 3))):
        _draw_node(draw, g)
    if not g.nodes:
        t = g.place(F32, (4, 1, 1, 1))
        if t is None:
            return Frame(int(Command.GRAPH_COMPUTE), struct.pack("<III", 0, 0, 0), label="empty graph")
        g.nodes.append(t.id)
    label = "graph " + ",".join(op_name(_op_of(g, n)) for n in g.nodes)
    tensors = list(g.tensors)
    if mutate and tensors:
        i = draw(st.integers(0, len(tensors) - 1))
        tensors[i], what = draw(mutate_tensor(tensors[i], arena))
        if draw(st.booleans()):
            params = list(tensors[i].op_params)
            params[draw(st.integers(0, 15))] = draw(_PARAM)
            tensors[i] = _replace(tensors[i], op_params=tuple(params))
            what += " + op_params"
        label += f" ({what})"
    req = m.GraphComputeRequest.from_tensors(0, g.nodes, tensors)
    return Frame(int(Command.GRAPH_COMPUTE), req.encode_payload(), label=label)


def _op_of(g: _GraphDraft, node_id: int) -> int:
    return next(t.op for t in g.tensors if t.id == node_id)


def _node(g: _GraphDraft, op, type_, ne, srcs, params=(), at: RpcTensor | None = None,
          **kw) -> RpcTensor | None:
    """A computed node, placed in fresh space or over the bytes of ``at`` (a view)."""
    params = tuple(params) + (0,) * (16 - len(params))
    fields = dict(op=int(op), op_params=params, flags=FLAG_COMPUTE,
                  src=tuple(s.id for s in srcs) + (0,) * (10 - len(srcs)), **kw)
    if at is not None:
        t = RpcTensor(id=g.next_id, type=type_, buffer=at.buffer, ne=tuple(ne), nb=at.nb,
                      data=at.data, view_src=at.id, **fields)
        g.next_id += 1
        g.tensors.append(t)
    else:
        t = g.place(type_, ne, **fields)
    if t is not None:
        g.nodes.append(t.id)
    return t


def _draw_node(draw, g: _GraphDraft) -> None:
    fam = draw(st.sampled_from(["binary", "unary", "glu", "scale", "norm", "cpy", "get_rows",
                                "set_rows", "mul_mat", "soft_max", "rope", "flash", "view",
                                "any-op"]))
    ftype = draw(st.sampled_from((F32, F32, F16, BF16)))
    ne = _dims(draw)
    ne[0] = draw(st.sampled_from((1, 2, 4, 8, 32, 64)))
    ne[3] = 1
    if fam == "binary":
        a = g.place(ftype, ne)
        bne = [draw(st.sampled_from((1, x))) for x in ne]
        b = g.place(draw(st.sampled_from((ftype, F32))), bne)
        if a and b:
            _node(g, draw(st.sampled_from((Op.ADD, Op.SUB, Op.MUL, Op.DIV))), ftype, ne, [a, b])
    elif fam == "unary":
        a = g.place(ftype, ne)
        if a:
            _node(g, Op.UNARY, ftype, ne, [a], [draw(st.integers(0, len(UnaryOp) + 1))])
    elif fam == "glu":
        a = g.place(ftype, ne)
        split = draw(st.booleans())
        b = g.place(ftype, ne) if split else None
        out = list(ne) if split else [max(1, ne[0] // 2)] + ne[1:]
        if a:
            _node(g, Op.GLU, ftype, out, [a] + ([b] if b else []),
                  [draw(st.integers(0, len(GluOp))), draw(st.integers(0, 1)), draw(_PARAM), draw(_PARAM)])
    elif fam == "scale":
        a = g.place(ftype, ne)
        if a:
            _node(g, Op.SCALE, ftype, ne, [a], [draw(_FLOATS), draw(_FLOATS)])
    elif fam == "norm":
        a = g.place(F32, ne)
        if a:
            _node(g, draw(st.sampled_from((Op.NORM, Op.RMS_NORM))), F32, ne, [a], [draw(_FLOATS)])
    elif fam == "cpy":
        a = g.place(ftype, ne)
        dtype = draw(st.sampled_from((F32, F16, BF16, Q8_0, Q4_0)))
        dne = list(ne)
        if type_traits(dtype).block_size > 1:
            dne[0] = 32 * max(1, ne[0] // 32)
        b = g.place(dtype, dne)
        if a and b:
            op = draw(st.sampled_from((Op.CPY, Op.DUP, Op.CONT)))
            if op == Op.CPY:
                _node(g, op, dtype, dne, [a, b], at=b)
            else:
                _node(g, op, ftype, ne, [a])
    elif fam == "get_rows":
        rows = g.place(draw(st.sampled_from((F32, F16, I32, Q8_0, Q4_0))),
                       [32 if draw(st.booleans()) else ne[0], ne[1], ne[2], 1])
        idx = g.place(I32, [draw(st.integers(1, 4)), ne[2], 1, 1])
        if rows and idx:
            out_t = I32 if rows.type == I32 else F32
            _node(g, Op.GET_ROWS, out_t, [rows.ne[0], idx.ne[0], idx.ne[1], 1], [rows, idx])
    elif fam == "set_rows":
        dst = g.place(ftype, ne)
        rows = g.place(F32, [ne[0], draw(st.integers(1, 3)), ne[2], 1])
        idx = g.place(draw(st.sampled_from((I32, I64))), [rows.ne[1] if rows else 1, 1, 1, 1])
        if dst and rows and idx:
            _node(g, Op.SET_ROWS, ftype, ne, [rows, idx, dst], at=dst)
    elif fam == "mul_mat":
        k = draw(st.sampled_from((32, 64)))
        wtype = draw(st.sampled_from((F32, F16, BF16, Q8_0, Q4_0)))
        a = g.place(wtype, [k, ne[1], ne[2], 1])
        b = g.place(F32, [k, draw(st.integers(1, 3)), ne[2], 1])
        if a and b:
            _node(g, Op.MUL_MAT, F32, [a.ne[1], b.ne[1], ne[2], 1], [a, b])
    elif fam == "soft_max":
        a = g.place(F32, ne)
        mask = g.place(draw(st.sampled_from((F32, F16))), [ne[0], ne[1], 1, 1]) \
            if draw(st.booleans()) else None
        if a:
            _node(g, Op.SOFT_MAX, F32, ne, [a] + ([mask] if mask else []),
                  [draw(_FLOATS), draw(_MOSTLY_ZERO)])
    elif fam == "rope":
        d = draw(st.sampled_from((2, 4, 8, 16)))
        a = g.place(ftype, [d, ne[1], ne[2], 1])
        pos = g.place(I32, [ne[2] * draw(st.sampled_from((1, 4))), 1, 1, 1])
        if a and pos:
            params = [0, draw(st.sampled_from((d, d, max(2, d // 2), 0, 1, d + 2))),
                      draw(st.sampled_from((0, 2, 8, 24, 40))), 0, draw(st.integers(0, 4096)),
                      draw(_FLOATS), draw(_FLOATS), draw(_FLOATS), draw(_FLOATS), draw(_FLOATS),
                      draw(_FLOATS)]
            _node(g, Op.ROPE, ftype, a.ne, [a, pos], params)
    elif fam == "flash":
        d = draw(st.sampled_from((4, 8, 32)))
        nq, nkv, h = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from((1, 2)))
        q = g.place(F32, [d, nq, h, 1])
        kv_t = draw(st.sampled_from((F16, F32, BF16)))
        k = g.place(kv_t, [d, nkv, 1, 1])
        v = g.place(kv_t, [d, nkv, 1, 1])
        mask = g.place(F16, [nkv, nq, 1, 1]) if draw(st.booleans()) else None
        if q and k and v:
            _node(g, Op.FLASH_ATTN_EXT, F32, [d, h, nq, 1], [q, k, v] + ([mask] if mask else []),
                  [draw(_FLOATS), draw(_MOSTLY_ZERO), draw(_MOSTLY_ZERO),
                   draw(st.sampled_from((0, 0, 10, 3)))])
    elif fam == "view":
        a = g.place(F32, ne)
        if a:
            op = draw(st.sampled_from((Op.VIEW, Op.RESHAPE, Op.PERMUTE, Op.TRANSPOSE)))
            t = RpcTensor(id=g.next_id, type=F32, buffer=a.buffer, ne=a.ne, nb=a.nb, data=a.data,
                          op=int(op), src=(a.id,) + (0,) * 9, view_src=a.id, flags=FLAG_COMPUTE)
            g.next_id += 1
            g.tensors.append(t)
            g.nodes.append(t.id)
    else:
        a = g.place(ftype, ne)
        b = g.place(ftype, ne)
        if a and b:
            op = draw(st.integers(0, OP_COUNT - 1).filter(lambda o: o not in FUNCTION_POINTER_OPS))
            _node(g, op, ftype, ne, [a, b], [draw(_PARAM) for _ in range(4)])


@st.composite
def hostile_graphs(draw, arena: Arena):
    """Graphs built to hurt a server."""
    handle, base, size = arena.buffers[0]
    kind = draw(st.sampled_from(["id0", "cycle", "dup", "fptr", "unknown-op", "zero-stride",
                                 "chain", "nullbuf", "counts", "missing-src", "self"]))
    t = lambda **kw: RpcTensor(**{"type": F32, "buffer": handle, "data": base,  # noqa: E731
                                  "ne": (4, 1, 1, 1), "nb": (4, 16, 16, 16), **kw})
    nodes, tensors = [1], []
    if kind == "id0":
        nodes, tensors = [0], []
    elif kind == "cycle":
        nodes, tensors = [1, 2], [t(id=1, op=Op.ADD, src=(2, 2) + (0,) * 8, flags=FLAG_COMPUTE),
                                  t(id=2, op=Op.ADD, src=(1, 1) + (0,) * 8, flags=FLAG_COMPUTE)]
    elif kind == "dup":
        nodes, tensors = [1, 1], [t(id=1), t(id=1)]
    elif kind == "fptr":
        op = draw(st.sampled_from(sorted(FUNCTION_POINTER_OPS)))
        tensors = [t(id=1, op=op, op_params=(0x41414141, 0x4141, 1) + (0,) * 13, flags=FLAG_COMPUTE)]
    elif kind == "unknown-op":
        tensors = [t(id=1, op=draw(st.integers(OP_COUNT, 2**32 - 1)), flags=FLAG_COMPUTE)]
    elif kind == "zero-stride":
        big = draw(st.sampled_from((1 << 20, 1 << 31, 2**32 - 1)))
        ne = (4, big, draw(st.sampled_from((1, 1024))), 1)
        tensors = [t(id=2, ne=ne, nb=(4, 0, 0, 0)), t(id=3, ne=ne, nb=(4, 0, 0, 0), data=base + 16),
                   t(id=1, ne=ne, nb=(4, 0, 0, 0), data=base + 32, op=draw(st.sampled_from(
                       (Op.ADD, Op.MUL, Op.CPY, Op.SCALE, Op.UNARY))), src=(2, 3) + (0,) * 8,
                     flags=FLAG_COMPUTE)]
    elif kind == "chain":
        n = draw(st.integers(100, 5000))
        tensors = [t(id=i + 1, src=((i + 2,) if i + 1 < n else (0,)) + (0,) * 9) for i in range(n)]
    elif kind == "nullbuf":
        tensors = [RpcTensor(id=2, type=F32, ne=(4, 0x7FFFFFFF, 1, 1), nb=(4, 0x10000, 0, 0),
                             data=draw(st.sampled_from((0, base, 0x1000)))),
                   t(id=3, type=I32, ne=(1, 1, 1, 1), nb=(4, 4, 4, 4)),
                   t(id=1, data=base + 16, op=Op.GET_ROWS, src=(2, 3) + (0,) * 8, flags=FLAG_COMPUTE)]
    elif kind == "counts":
        n_nodes = draw(st.sampled_from((2**20, 2**32 - 1, 3)))
        payload = struct.pack("<II", 0, n_nodes) + struct.pack("<Q", 1) * 2 + struct.pack(
            "<I", draw(st.sampled_from((0, 1, 2**32 - 1))))
        return Frame(int(Command.GRAPH_COMPUTE), payload, label=f"graph counts n_nodes={n_nodes}")
    elif kind == "missing-src":
        tensors = [t(id=1, op=draw(st.sampled_from((Op.ADD, Op.MUL_MAT, Op.GET_ROWS, Op.ROPE,
                                                    Op.FLASH_ATTN_EXT, Op.SET_ROWS))),
                     src=(draw(st.sampled_from((0, 99))),) + (0,) * 9, flags=FLAG_COMPUTE)]
    else:
        tensors = [t(id=1, op=Op.ADD, src=(1, 1) + (0,) * 8, flags=FLAG_COMPUTE)]
    req = m.GraphComputeRequest.from_tensors(0, nodes, tensors)
    return Frame(int(Command.GRAPH_COMPUTE), req.encode_payload(), label=f"hostile graph: {kind}")


__all__ = ["Arena", "Frame", "frame_of", "placed_tensors", "mutate_tensor", "valid_requests",
           "near_valid_requests", "hostile_requests", "requests", "graphs", "hostile_graphs",
           "VALID_TYPES"]
