"""The catalogue of protocol 7.0.0: every request and response and its payload codec
(spec/commands.md).

Each class knows its command number and how to turn itself into a payload and back.  Framing
(command byte and length prefix) is the connection's job (:mod:`refimpl.protocol.connection`).
Decoders check lengths and nothing else: whether a handle is live or a region is in bounds
is for the server to decide.  Constructors check that every number fits its field
(LocalProtocolError).  What older protocol versions do differently is a layer on top:
:mod:`refimpl.protocol.compat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .constants import CONN_CAPS_SIZE, MAX_SRC, Command
from .errors import MalformedMessage
from .layout import Layout
from .tensor import RPC_TENSOR, RPC_TENSOR_SIZE, RpcTensor

__all__ = [
    # the shape every message has
    "Message", "FixedMessage",
    # requests
    "HelloRequest", "DeviceCountRequest", "AllocBufferRequest", "GetAlignmentRequest",
    "GetMaxSizeRequest", "BufferGetBaseRequest", "FreeBufferRequest", "BufferClearRequest",
    "SetTensorRequest", "SetTensorHashRequest", "GetTensorRequest", "CopyTensorRequest",
    "GraphComputeRequest", "GraphRecomputeRequest", "GetDeviceMemoryRequest",
    "InitTensorRequest", "GetAllocSizeRequest", "MemsetTensorRequest",
    # responses
    "HelloResponse", "DeviceCountResponse", "AllocBufferResponse", "GetAlignmentResponse",
    "GetMaxSizeResponse", "BufferGetBaseResponse", "SetTensorHashResponse",
    "GetTensorResponse", "CopyTensorResponse", "GetDeviceMemoryResponse",
    "GetAllocSizeResponse",
    # tables and layouts
    "REQUESTS", "RESPONSES", "has_response", "SET_TENSOR_HEADER", "SET_TENSOR_HEADER_SIZE",
    "GRAPH_HEADER", "graph_payload_size",
]

_TENSOR_FIELD = "tensor"


class Message:
    """Base class of every request and response."""

    COMMAND: ClassVar[Command]

    def encode_payload(self) -> bytes:  # pragma: no cover - every subclass overrides
        """The payload bytes of this message (without the framing header)."""
        raise NotImplementedError

    @classmethod
    def decode_payload(cls, payload) -> "Message":  # pragma: no cover
        """Decode a complete payload; raises MalformedMessage when it cannot."""
        raise NotImplementedError


class FixedMessage(Message):
    """A message whose payload has one fixed layout, declared in ``FIELDS``.

    ``FIELDS`` rows are ``(name, kind[, count])`` with the kinds of :class:`Layout` plus
    ``"tensor"`` (an encoded :class:`RpcTensor`, 296 bytes).
    """

    FIELDS: ClassVar[list] = []
    LAYOUT: ClassVar[Layout]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        rows = []
        for row in cls.FIELDS:
            name, kind = row[0], row[1]
            count = row[2] if len(row) > 2 else 1
            if kind == _TENSOR_FIELD:
                rows.append((name, "char", RPC_TENSOR_SIZE * count))
            else:
                rows.append((name, kind, count))
        cls.LAYOUT = Layout(cls.__name__, rows)

    def __post_init__(self):
        self.LAYOUT.check({row[0]: getattr(self, row[0])
                           for row in self.FIELDS if row[1] != _TENSOR_FIELD})

    @classmethod
    def payload_size(cls) -> int:
        """The exact payload size every instance encodes to."""
        return cls.LAYOUT.size

    def encode_payload(self) -> bytes:
        """Encode all fields in declaration order."""
        values = {}
        for row in self.FIELDS:
            name, kind = row[0], row[1]
            v = getattr(self, name)
            if kind == _TENSOR_FIELD:
                v = b"".join(t.encode() for t in v) if len(row) > 2 else v.encode()
            values[name] = v
        return self.LAYOUT.pack(values)

    @classmethod
    def decode_payload(cls, payload):
        """Decode a payload of exactly :meth:`payload_size` bytes."""
        if len(payload) != cls.LAYOUT.size:
            raise MalformedMessage(
                f"{cls.__name__} payload must be {cls.LAYOUT.size} bytes, got {len(payload)}")
        values = cls.LAYOUT.unpack(payload)
        for row in cls.FIELDS:
            name, kind = row[0], row[1]
            if kind == _TENSOR_FIELD:
                raw = values[name]
                if len(row) > 2:
                    values[name] = tuple(RpcTensor.decode(raw, i * RPC_TENSOR_SIZE)
                                         for i in range(row[2]))
                else:
                    values[name] = RpcTensor.decode(raw)
        return cls(**values)


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HelloRequest(FixedMessage):
    """HELLO: opens every connection; carries the client's connection capabilities."""

    COMMAND = Command.HELLO
    FIELDS = [("conn_caps", "char", CONN_CAPS_SIZE)]
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@dataclass(frozen=True)
class DeviceCountRequest(FixedMessage):
    """DEVICE_COUNT: how many devices the server exposes (empty payload)."""

    COMMAND = Command.DEVICE_COUNT
    FIELDS = []


@dataclass(frozen=True)
class AllocBufferRequest(FixedMessage):
    """ALLOC_BUFFER: allocate ``size`` bytes on ``device``."""

    COMMAND = Command.ALLOC_BUFFER
    FIELDS = [("device", "u32"), ("size", "u64")]
    device: int = 0
    size: int = 0


@dataclass(frozen=True)
class GetAlignmentRequest(FixedMessage):
    """GET_ALIGNMENT: the alignment tensors in ``device``'s buffers must have."""

    COMMAND = Command.GET_ALIGNMENT
    FIELDS = [("device", "u32")]
    device: int = 0


@dataclass(frozen=True)
class GetMaxSizeRequest(FixedMessage):
    """GET_MAX_SIZE: the largest single buffer ``device`` allocates."""

    COMMAND = Command.GET_MAX_SIZE
    FIELDS = [("device", "u32")]
    device: int = 0


@dataclass(frozen=True)
class BufferGetBaseRequest(FixedMessage):
    """BUFFER_GET_BASE: the base address of a buffer."""

    COMMAND = Command.BUFFER_GET_BASE
    FIELDS = [("handle", "u64")]
    handle: int = 0


@dataclass(frozen=True)
class FreeBufferRequest(FixedMessage):
    """FREE_BUFFER: release a buffer (no response)."""

    COMMAND = Command.FREE_BUFFER
    FIELDS = [("handle", "u64")]
    handle: int = 0


@dataclass(frozen=True)
class BufferClearRequest(FixedMessage):
    """BUFFER_CLEAR: fill a whole buffer with one byte value (no response)."""

    COMMAND = Command.BUFFER_CLEAR
    FIELDS = [("handle", "u64"), ("value", "u8")]
    handle: int = 0
    value: int = 0


@dataclass(frozen=True)
class SetTensorHashRequest(FixedMessage):
    """SET_TENSOR_HASH: write cached bytes with FNV-1a hash ``hash`` into a tensor."""

    COMMAND = Command.SET_TENSOR_HASH
    FIELDS = [("tensor", "tensor"), ("offset", "u64"), ("hash", "u64")]
    tensor: RpcTensor = RpcTensor()
    offset: int = 0
    hash: int = 0


@dataclass(frozen=True)
class GetTensorRequest(FixedMessage):
    """GET_TENSOR: read ``size`` bytes of a tensor starting at byte ``offset``."""

    COMMAND = Command.GET_TENSOR
    FIELDS = [("tensor", "tensor"), ("offset", "u64"), ("size", "u64")]
    tensor: RpcTensor = RpcTensor()
    offset: int = 0
    size: int = 0


@dataclass(frozen=True)
class CopyTensorRequest(FixedMessage):
    """COPY_TENSOR: copy ``nbytes(src)`` bytes from ``src`` to ``dst`` on the server."""

    COMMAND = Command.COPY_TENSOR
    FIELDS = [("src", "tensor"), ("dst", "tensor")]
    src: RpcTensor = RpcTensor()
    dst: RpcTensor = RpcTensor()


@dataclass(frozen=True)
class GraphRecomputeRequest(FixedMessage):
    """GRAPH_RECOMPUTE: run the last graph stored for ``device`` again (no response)."""

    COMMAND = Command.GRAPH_RECOMPUTE
    FIELDS = [("device", "u32")]
    device: int = 0


@dataclass(frozen=True)
class GetDeviceMemoryRequest(FixedMessage):
    """GET_DEVICE_MEMORY: free and total memory of ``device``."""

    COMMAND = Command.GET_DEVICE_MEMORY
    FIELDS = [("device", "u32")]
    device: int = 0


@dataclass(frozen=True)
class InitTensorRequest(FixedMessage):
    """INIT_TENSOR: let the device prepare a freshly placed tensor (no response)."""

    COMMAND = Command.INIT_TENSOR
    FIELDS = [("tensor", "tensor")]
    tensor: RpcTensor = RpcTensor()


@dataclass(frozen=True)
class GetAllocSizeRequest(FixedMessage):
    """GET_ALLOC_SIZE: bytes ``device`` needs to hold ``tensor`` (whose sources are ``srcs``)."""

    COMMAND = Command.GET_ALLOC_SIZE
    FIELDS = [("device", "u32"), ("tensor", "tensor"), ("srcs", "tensor", MAX_SRC)]
    device: int = 0
    tensor: RpcTensor = RpcTensor()
    srcs: tuple = (RpcTensor(),) * MAX_SRC


@dataclass(frozen=True)
class MemsetTensorRequest(FixedMessage):
    """MEMSET_TENSOR: fill ``size`` bytes of a tensor from ``offset`` with ``value`` (no response)."""

    COMMAND = Command.MEMSET_TENSOR
    FIELDS = [("tensor", "tensor"), ("offset", "u64"), ("size", "u64"), ("value", "u8")]
    tensor: RpcTensor = RpcTensor()
    offset: int = 0
    size: int = 0
    value: int = 0


#: Bytes of a SET_TENSOR payload before the data: tensor, cache flag (u8), offset (u64).
SET_TENSOR_HEADER = Layout("set_tensor_header", [
    ("tensor", "char", RPC_TENSOR_SIZE), ("cache_flag", "u8"), ("offset", "u64")])
SET_TENSOR_HEADER_SIZE = SET_TENSOR_HEADER.size


@dataclass(frozen=True)
class SetTensorRequest(Message):
    """SET_TENSOR: write ``data`` into a tensor at byte ``offset`` (no response).

    ``cache_flag`` 1 asks a server with a hash cache to keep a copy of the data.  (Versions
    before 7.0.0 have no flag: :mod:`.compat` lays the header out for them.)
    """

    COMMAND = Command.SET_TENSOR
    tensor: RpcTensor = RpcTensor()
    offset: int = 0
    data: bytes = b""
    cache_flag: int = 0

    def __post_init__(self):
        SET_TENSOR_HEADER.check({"cache_flag": self.cache_flag, "offset": self.offset})

    def header_values(self) -> dict:
        """The header's fields as a field -> value dict (for :class:`Layout` packing)."""
        return {"tensor": self.tensor.encode(), "cache_flag": self.cache_flag,
                "offset": self.offset}

    def encode_header(self) -> bytes:
        """The payload bytes that precede the data."""
        return SET_TENSOR_HEADER.pack(self.header_values())

    def encode_payload(self) -> bytes:
        """Header followed by the data."""
        return self.encode_header() + bytes(self.data)

    @classmethod
    def decode_header(cls, header) -> tuple[RpcTensor, int, int]:
        """Decode the fixed part: ``(tensor, cache_flag, offset)``."""
        v = SET_TENSOR_HEADER.unpack(header)
        return RpcTensor.decode(v["tensor"]), v["cache_flag"], v["offset"]

    @classmethod
    def decode_payload(cls, payload):
        """Decode a complete SET_TENSOR payload."""
        if len(payload) < SET_TENSOR_HEADER_SIZE:
            raise MalformedMessage(f"SET_TENSOR payload must be at least "
                                   f"{SET_TENSOR_HEADER_SIZE} bytes, got {len(payload)}")
        tensor, flag, offset = cls.decode_header(payload)
        return cls(tensor, offset, bytes(payload[SET_TENSOR_HEADER_SIZE:]), flag)


#: The fixed part at the start of a GRAPH_COMPUTE payload: device (u32), n_nodes (u32).
GRAPH_HEADER = Layout("graph_header", [("device", "u32"), ("n_nodes", "u32")])


def graph_payload_size(n_nodes: int, n_tensors: int) -> int:
    """Exact size of a GRAPH_COMPUTE payload with these counts (spec/graph.md)."""
    return GRAPH_HEADER.size + 8 * n_nodes + 4 + RPC_TENSOR_SIZE * n_tensors


@dataclass(frozen=True, eq=False)
class GraphComputeRequest(Message):
    """GRAPH_COMPUTE: a serialised graph for ``device`` (no response).

    ``nodes`` holds the ids of the graph's nodes in execution order (an ``uint64`` array);
    ``tensors`` every tensor the nodes reach, as a structured array of ``RPC_TENSOR.dtype``.
    """

    COMMAND = Command.GRAPH_COMPUTE
    device: int = 0
    nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    tensors: np.ndarray = field(default_factory=lambda: np.zeros(0, RPC_TENSOR.dtype))

    def __post_init__(self):
        GRAPH_HEADER.check({"device": self.device})

    @classmethod
    def from_tensors(cls, device: int, nodes, tensors) -> "GraphComputeRequest":
        """Build from node ids and a sequence of :class:`RpcTensor`."""
        raw = b"".join(t.encode() for t in tensors)
        arr = np.frombuffer(raw, dtype=RPC_TENSOR.dtype, count=len(tensors))
        return cls(device, np.asarray(nodes, dtype=np.uint64), arr)

    def tensor(self, i: int) -> RpcTensor:
        """Tensor ``i`` as an :class:`RpcTensor`."""
        return RpcTensor.from_record(self.tensors[i])

    def encode_payload(self) -> bytes:
        """device, n_nodes, node ids, n_tensors, tensors."""
        nodes = np.ascontiguousarray(self.nodes, dtype="<u8")
        tensors = np.ascontiguousarray(self.tensors, dtype=RPC_TENSOR.dtype)
        return b"".join([
            GRAPH_HEADER.pack({"device": self.device, "n_nodes": len(nodes)}),
            nodes.tobytes(),
            len(tensors).to_bytes(4, "little"),
            tensors.tobytes(),
        ])

    @classmethod
    def decode_payload(cls, payload):
        """Decode; the payload size must match the counts it declares exactly."""
        if len(payload) < GRAPH_HEADER.size + 4:
            raise MalformedMessage(f"GRAPH_COMPUTE payload too short ({len(payload)} bytes)")
        head = GRAPH_HEADER.unpack(payload)
        n_nodes = head["n_nodes"]
        count_at = GRAPH_HEADER.size + 8 * n_nodes
        if len(payload) < count_at + 4:
            raise MalformedMessage(
                f"GRAPH_COMPUTE declares {n_nodes} nodes but has {len(payload)} bytes")
        n_tensors = int.from_bytes(bytes(payload[count_at:count_at + 4]), "little")
        expected = graph_payload_size(n_nodes, n_tensors)
        if len(payload) != expected:
            raise MalformedMessage(
                f"GRAPH_COMPUTE with {n_nodes} nodes and {n_tensors} tensors must be "
                f"{expected} bytes, got {len(payload)}")
        nodes = np.frombuffer(payload, dtype="<u8", count=n_nodes, offset=GRAPH_HEADER.size)
        tensors = np.frombuffer(payload, dtype=RPC_TENSOR.dtype, count=n_tensors,
                                offset=count_at + 4)
        return cls(head["device"], nodes, tensors)

    def __eq__(self, other):
        if not isinstance(other, GraphComputeRequest):
            return NotImplemented
        return self.encode_payload() == other.encode_payload()

    __hash__ = None


# ------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HelloResponse(FixedMessage):
    """Reply to HELLO: the server's protocol version and its connection capabilities."""

    COMMAND = Command.HELLO
    FIELDS = [("major", "u8"), ("minor", "u8"), ("patch", "u8"), ("padding", "u8"),
              ("conn_caps", "char", CONN_CAPS_SIZE)]
    major: int = 0
    minor: int = 0
    patch: int = 0
    padding: int = 0
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@dataclass(frozen=True)
class DeviceCountResponse(FixedMessage):
    """Reply to DEVICE_COUNT."""

    COMMAND = Command.DEVICE_COUNT
    FIELDS = [("count", "u32")]
    count: int = 0


@dataclass(frozen=True)
class AllocBufferResponse(FixedMessage):
    """Reply to ALLOC_BUFFER: handle and size of the new buffer; both 0 when allocation failed."""

    COMMAND = Command.ALLOC_BUFFER
    FIELDS = [("handle", "u64"), ("size", "u64")]
    handle: int = 0
    size: int = 0


@dataclass(frozen=True)
class GetAlignmentResponse(FixedMessage):
    """Reply to GET_ALIGNMENT."""

    COMMAND = Command.GET_ALIGNMENT
    FIELDS = [("alignment", "u64")]
    alignment: int = 0


@dataclass(frozen=True)
class GetMaxSizeResponse(FixedMessage):
    """Reply to GET_MAX_SIZE."""

    COMMAND = Command.GET_MAX_SIZE
    FIELDS = [("max_size", "u64")]
    max_size: int = 0


@dataclass(frozen=True)
class BufferGetBaseResponse(FixedMessage):
    """Reply to BUFFER_GET_BASE."""

    COMMAND = Command.BUFFER_GET_BASE
    FIELDS = [("base", "u64")]
    base: int = 0


@dataclass(frozen=True)
class SetTensorHashResponse(FixedMessage):
    """Reply to SET_TENSOR_HASH: 1 when the cached bytes were written, 0 on a cache miss."""

    COMMAND = Command.SET_TENSOR_HASH
    FIELDS = [("result", "u8")]
    result: int = 0


@dataclass(frozen=True)
class GetTensorResponse(Message):
    """Reply to GET_TENSOR: exactly the requested bytes."""

    COMMAND = Command.GET_TENSOR
    data: bytes = b""

    def encode_payload(self) -> bytes:
        """The data itself."""
        return bytes(self.data)

    @classmethod
    def decode_payload(cls, payload):
        """Any length is well-formed; the connection checks it against the request."""
        return cls(bytes(payload))


@dataclass(frozen=True)
class CopyTensorResponse(FixedMessage):
    """Reply to COPY_TENSOR: 1 when the copy was made."""

    COMMAND = Command.COPY_TENSOR
    FIELDS = [("result", "u8")]
    result: int = 0


@dataclass(frozen=True)
class GetDeviceMemoryResponse(FixedMessage):
    """Reply to GET_DEVICE_MEMORY."""

    COMMAND = Command.GET_DEVICE_MEMORY
    FIELDS = [("free", "u64"), ("total", "u64")]
    free: int = 0
    total: int = 0


@dataclass(frozen=True)
class GetAllocSizeResponse(FixedMessage):
    """Reply to GET_ALLOC_SIZE."""

    COMMAND = Command.GET_ALLOC_SIZE
    FIELDS = [("size", "u64")]
    size: int = 0


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

#: Request class of every command.
REQUESTS: dict[Command, type[Message]] = {
    cls.COMMAND: cls for cls in (
        AllocBufferRequest, GetAlignmentRequest, GetMaxSizeRequest, BufferGetBaseRequest,
        FreeBufferRequest, BufferClearRequest, SetTensorRequest, SetTensorHashRequest,
        GetTensorRequest, CopyTensorRequest, GraphComputeRequest, GetDeviceMemoryRequest,
        InitTensorRequest, GetAllocSizeRequest, HelloRequest, DeviceCountRequest,
        GraphRecomputeRequest, MemsetTensorRequest)
}

#: Response class of every command that has a response; the others are absent.
RESPONSES: dict[Command, type[Message]] = {
    cls.COMMAND: cls for cls in (
        HelloResponse, DeviceCountResponse, AllocBufferResponse, GetAlignmentResponse,
        GetMaxSizeResponse, BufferGetBaseResponse, SetTensorHashResponse, GetTensorResponse,
        CopyTensorResponse, GetDeviceMemoryResponse, GetAllocSizeResponse)
}


def has_response(command: Command) -> bool:
    """Whether a 7.0.0 server answers ``command`` (spec/commands.md, "Which commands answer");
    other versions: :func:`.compat.has_response`."""
    return command in RESPONSES
