"""Build small ggml graphs in tests, exactly as a client would send them, and run them.

    g = GraphBuilder()
    a = g.input(GgmlType.F32, (8, 4), values)                  # a leaf with data
    b = g.input(GgmlType.F32, (8, 1), other)
    s = g.node(Op.ADD, GgmlType.F32, (8, 4), [a, b])           # a computed tensor
    g.run()                                                    # build + validate + bind + run
    result = g.read(s)                                         # numpy, shape (ne3, ne2, ne1, ne0)

Tensors live in one CPU buffer registered in a real BufferTable; ``run`` encodes a real
GraphComputeRequest and goes through the same build/validation path as the server.
"""

from __future__ import annotations

import itertools

import numpy as np

from refimpl.devices import CpuDevice
from refimpl.graph import Op, compile_graph
from refimpl.graph.build import build_graph
from refimpl.kernels.cpu_tensors import bf16_to_f32, f32_to_bf16
from refimpl.protocol.ggml_types import GgmlType, type_traits
from refimpl.protocol.messages import GraphComputeRequest
from refimpl.protocol.tensor import RpcTensor, contiguous_strides, tensor_nbytes
from refimpl.buffers import BufferTable

_ALIGN = 32


class GraphBuilder:
    """A graph under construction over one arena buffer."""

    def __init__(self, arena_bytes: int = 64 << 20, device: CpuDevice | None = None):
        self.device = device or CpuDevice(capacity=max(arena_bytes, 1 << 20))
        self.table = BufferTable([self.device])
        memory = self.device.allocate(arena_bytes)
        if memory is None:
            raise MemoryError(f"cannot allocate a {arena_bytes}-byte arena")
        self.buf = self.table.add(0, memory)
        self._next = 0
        self._ids = itertools.count(1)
        self.tensors: list[RpcTensor] = []
        self.nodes: list[int] = []
        self.plan = None

    # -- placement --------------------------------------------------------------------------
    def _place(self, nbytes: int) -> int:
        at = -(-self._next // _ALIGN) * _ALIGN
        if at + nbytes > self.buf.size:
            raise MemoryError("arena full")
        self._next = at + nbytes
        return at

    def _add(self, *, type_, ne, nb=None, op=Op.NONE, srcs=(), params=None, at=None,
             view_src: RpcTensor | None = None, view_offs: int = 0, name="", node=False,
             buffer=None, data=None, flags=0) -> RpcTensor:
        ne = tuple(ne) + (1,) * (4 - len(ne))
        if nb is None:
            nb = contiguous_strides(type_, ne)
        nb = list(nb)
        while len(nb) < 4:  # unspecified outer strides: just past the previous dimension
            k = len(nb)
            nb.append(max(nb[i] * ne[i] for i in range(k)))
        nb = tuple(nb)
        if at is None:
            at = self._place(tensor_nbytes(type_, ne, nb))
        params = list(params or [])
        op_params = []
        for p in params + [0] * (16 - len(params)):
            if isinstance(p, float):
                p = int(np.array([p], np.float32).view(np.int32)[0])
            op_params.append(int(p))
        t = RpcTensor(
            id=next(self._ids), type=int(type_), ne=ne, nb=nb, op=int(op),
            op_params=tuple(op_params), flags=int(flags),
            src=tuple(s.id if s is not None else 0 for s in srcs) + (0,) * (10 - len(srcs)),
            view_src=view_src.id if view_src is not None else 0, view_offs=view_offs,
            buffer=self.buf.handle if buffer is None else buffer,
            data=(self.buf.base + at) if data is None else data,
            name=name.encode()[:63])
        self.tensors.append(t)
        if node:
            self.nodes.append(t.id)
        return t

    # -- public API ----------------------------------------------------------------------------
    def input(self, type_, ne, values=None, *, nb=None, name="", flags=0) -> RpcTensor:
        """A leaf tensor, filled with ``values`` (float array for float types, raw bytes or
        an integer array otherwise); ``flags`` as ggml's tensor flags (4: trainable)."""
        t = self._add(type_=type_, ne=ne, nb=nb, name=name or f"in{len(self.tensors)}",
                      flags=flags)
        if values is not None:
            self.write(t, values)
        return t

    def node(self, op, type_, ne, srcs, params=None, *, nb=None, name="", inplace_of=None) -> RpcTensor:
        """A computed tensor; ``inplace_of`` makes it share the bytes of that tensor."""
        at = None
        if inplace_of is not None:
            at = inplace_of.data - self.buf.base
        return self._add(type_=type_, ne=ne, nb=nb, op=op, srcs=srcs, params=params, at=at,
                         name=name or f"{Op(op).name.lower()}{len(self.tensors)}", node=True)

    def view(self, parent: RpcTensor, ne, nb, offset: int = 0, op=Op.VIEW, as_node=True,
             params=None) -> RpcTensor:
        """A view of ``parent`` (VIEW, RESHAPE, PERMUTE or TRANSPOSE), as ggml builds them."""
        base = self._base_of(parent)
        offs = (parent.data - base.data) + offset
        return self._add(type_=parent.type, ne=ne, nb=nb, op=op, srcs=[parent], params=params,
                         at=parent.data - self.buf.base + offset, view_src=base, view_offs=offs,
                         name=f"view{len(self.tensors)}", node=as_node)

    def _base_of(self, t: RpcTensor) -> RpcTensor:
        while t.view_src:
            t = next(x for x in self.tensors if x.id == t.view_src)
        return t

    def request(self) -> GraphComputeRequest:
        """The GRAPH_COMPUTE request a client would send."""
        return GraphComputeRequest.from_tensors(0, self.nodes, self.tensors)

    def compile(self):
        """Build and bind (raises GraphInvalid like the server would)."""
        graph = build_graph(self.request(), self.table)
        self.plan = compile_graph(graph, self.device)
        return self.plan

    def run(self) -> None:
        """Compile (if needed) and run."""
        if self.plan is None:
            self.compile()
        self.plan.run()

    # -- data ----------------------------------------------------------------------------------
    def _raw(self, t: RpcTensor) -> np.ndarray:
        at = t.data - self.buf.base
        return self.buf.memory.array[at:at + tensor_nbytes(t.type, t.ne, t.nb)]

    def write(self, t: RpcTensor, values) -> None:
        """Fill a contiguous tensor: floats are converted to its type, bytes copied as is."""
        raw = self._raw(t)
        if isinstance(values, (bytes, bytearray)) or (isinstance(values, np.ndarray) and values.dtype == np.uint8):
            raw[:] = np.frombuffer(bytes(values), np.uint8) if not isinstance(values, np.ndarray) else values.ravel()
            return
        arr = np.asarray(values)
        if t.type == GgmlType.F32:
            raw.view(np.float32)[:] = arr.astype(np.float32).ravel()
        elif t.type == GgmlType.F16:
            raw.view(np.float16)[:] = arr.astype(np.float16).ravel()
        elif t.type == GgmlType.BF16:
            raw.view(np.uint16)[:] = f32_to_bf16(arr.astype(np.float32).ravel())
        elif t.type == GgmlType.I32:
            raw.view(np.int32)[:] = arr.astype(np.int32).ravel()
        elif t.type == GgmlType.I64:
            raw.view(np.int64)[:] = arr.astype(np.int64).ravel()
        else:
            raise TypeError(f"write(): give raw bytes for {type_traits(t.type).name}")

    def read(self, t: RpcTensor) -> np.ndarray:
        """A contiguous tensor's values, shape (ne3, ne2, ne1, ne0); floats as float32."""
        return tensor_values(t, self._raw(t))


def tensor_values(t: RpcTensor, raw: np.ndarray) -> np.ndarray:
    """The values of contiguous tensor ``t`` from its bytes ``raw`` (uint8), shape (ne3, ne2,
    ne1, ne0): F32, F16 and BF16 as float32, I32 as int32, block formats as a copy of the
    bytes."""
    shape = (t.ne[3], t.ne[2], t.ne[1], t.ne[0])
    if t.type == GgmlType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if t.type == GgmlType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if t.type == GgmlType.BF16:
        return bf16_to_f32(raw.view(np.uint16)).reshape(shape)
    if t.type == GgmlType.I32:
        return raw.view(np.int32).reshape(shape).copy()
    return raw.copy()
