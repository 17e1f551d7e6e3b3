"""``refimpl-capture show``: a capture as an annotated, readable trace.

Each message gets one line (time, connection, direction, command, decoded fields); graphs
list their nodes with ops, types, shapes and sources; the first time a command appears, a
short note says what it is for, so a reader new to the protocol can follow the session.
"""

from __future__ import annotations

import json

from ..graph.ops import op_name
from ..protocol import messages as m
from ..protocol.constants import Command
from ..protocol.ggml_types import type_name
from ..protocol.observer import Observer
from ..protocol.tensor import RpcTensor, tensor_nbytes
from .fileformat import CLIENT_TO_SERVER, CLOSED, MESSAGE, NOTE, OPENED, Capture

NOTES = {
    Command.HELLO: "The handshake: the client's first message. The reply gives the server's "
                   "protocol version; the client refuses a different major version.",
    Command.DEVICE_COUNT: "How many devices (CPU, GPUs) the server exposes; each gets an index.",
    Command.GET_ALIGNMENT: "Tensor data in this device's buffers must start at multiples of this.",
    Command.GET_MAX_SIZE: "The largest single buffer; bigger allocations are split by the client.",
    Command.GET_DEVICE_MEMORY: "Free and total memory, used to decide how many layers fit.",
    Command.ALLOC_BUFFER: "Memory on a device. The reply's handle names the buffer from now on.",
    Command.BUFFER_GET_BASE: "The buffer's base address: the client places tensors at base + offset.",
    Command.INIT_TENSOR: "A tensor was placed in a buffer; devices that pad rows prepare it.",
    Command.GET_ALLOC_SIZE: "How many bytes a device needs for a tensor (some devices pad).",
    Command.SET_TENSOR: "Bytes uploaded into a tensor (weights at load time, inputs per batch). "
                        "No reply.",
    Command.SET_TENSOR_HASH: "For large weights: 'do you already have bytes with this hash?' "
                             "1 = yes, written from the server's cache; 0 = send them.",
    Command.GET_TENSOR: "Bytes downloaded from a tensor (typically the logits after a graph).",
    Command.COPY_TENSOR: "A copy between two tensors on the server.",
    Command.BUFFER_CLEAR: "Every byte of a buffer set to one value. No reply.",
    Command.MEMSET_TENSOR: "Part of a tensor set to one byte value. No reply.",
    Command.FREE_BUFFER: "A buffer given back. No reply.",
    Command.GRAPH_COMPUTE: "A computation graph: the nodes to run, in order, and every tensor "
                           "they touch. No reply; results are read with GET_TENSOR.",
    Command.GRAPH_RECOMPUTE: "Run the last graph again (inputs changed, graph did not). No reply.",
}


def _t(t: RpcTensor) -> str:
    shape = [n for n in t.ne]
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    return f"'{t.label}' {type_name(t.type)} {shape}"


def describe_request(msg) -> str:
    """One line about a request."""
    c = msg.COMMAND
    if isinstance(msg, m.HelloRequest):
        return "HELLO caps=" + ("zero (TCP)" if not any(msg.conn_caps) else msg.conn_caps.hex())
    if isinstance(msg, m.AllocBufferRequest):
        return f"ALLOC_BUFFER device {msg.device}, {msg.size} bytes"
    if isinstance(msg, (m.GetAlignmentRequest, m.GetMaxSizeRequest, m.GetDeviceMemoryRequest,
                        m.GraphRecomputeRequest)):
        return f"{c.name} device {msg.device}"
    if isinstance(msg, (m.BufferGetBaseRequest, m.FreeBufferRequest)):
        return f"{c.name} handle {msg.handle:#x}"
    if isinstance(msg, m.BufferClearRequest):
        return f"BUFFER_CLEAR handle {msg.handle:#x} value {msg.value}"
    if isinstance(msg, m.SetTensorRequest):
        return (f"SET_TENSOR {_t(msg.tensor)} offset {msg.offset}, {len(msg.data)} bytes"
                + (", cache it" if msg.cache_flag else ""))
    if isinstance(msg, m.SetTensorHashRequest):
        return f"SET_TENSOR_HASH {_t(msg.tensor)} offset {msg.offset} hash {msg.hash:016x}"
    if isinstance(msg, m.GetTensorRequest):
        return f"GET_TENSOR {_t(msg.tensor)} offset {msg.offset}, {msg.size} bytes"
    if isinstance(msg, m.CopyTensorRequest):
        return f"COPY_TENSOR {_t(msg.src)} -> {_t(msg.dst)}"
    if isinstance(msg, m.InitTensorRequest):
        return f"INIT_TENSOR {_t(msg.tensor)}"
    if isinstance(msg, m.GetAllocSizeRequest):
        return f"GET_ALLOC_SIZE device {msg.device} {_t(msg.tensor)} op {op_name(msg.tensor.op)}"
    if isinstance(msg, m.MemsetTensorRequest):
        return f"MEMSET_TENSOR {_t(msg.tensor)} offset {msg.offset}, {msg.size} bytes = {msg.value}"
    if isinstance(msg, m.GraphComputeRequest):
        return f"GRAPH_COMPUTE device {msg.device}: {len(msg.nodes)} nodes, {len(msg.tensors)} tensors"
    return c.name


def describe_reply(msg) -> str:
    """One line about a reply."""
    if isinstance(msg, m.HelloResponse):
        return f"protocol {msg.major}.{msg.minor}.{msg.patch}"
    if isinstance(msg, m.AllocBufferResponse):
        return f"handle {msg.handle:#x}, {msg.size} bytes" if msg.handle else "FAILED (no memory)"
    if isinstance(msg, m.GetTensorResponse):
        return f"{len(msg.data)} bytes"
    if isinstance(msg, m.FixedMessage):
        return ", ".join(f"{row[0]}={getattr(msg, row[0])}" for row in msg.FIELDS
                         if row[0] not in ("padding", "conn_caps"))
    return ""


def graph_lines(msg: m.GraphComputeRequest, limit: int) -> list[str]:
    """The graph's nodes: op, result and sources by name."""
    tensors = {int(r["id"]): msg.tensor(i) for i, r in enumerate(msg.tensors)}
    lines = []
    for i, nid in enumerate(msg.nodes.tolist()[:limit]):
        t = tensors.get(nid)
        if t is None:
            lines.append(f"      #{i} (missing tensor {nid:#x})")
            continue
        srcs = [f"'{tensors[s].label}'" for s in t.src if s and s in tensors]
        lines.append(f"      #{i:<3} {op_name(t.op):<14} {_t(t)}"
                     + (f"  <- {', '.join(srcs)}" if srcs else ""))
    if len(msg.nodes) > limit:
        lines.append(f"      ... {len(msg.nodes) - limit} more nodes")
    return lines


def render(cap: Capture, *, graph_nodes: int = 40, notes: bool = True) -> str:
    """The whole capture as text."""
    out = [f"capture: {json.dumps(cap.meta, sort_keys=True)}"]
    observers: dict[int, Observer] = {}
    seen: set = set()
    counters: dict[int, int] = {}
    for rec in cap.records:
        t = rec.time_ns / 1e9
        head = f"{t:9.4f}s  c{rec.connection}"
        if rec.kind == OPENED:
            out.append(f"{head}  === connection opened {rec.data.decode()}")
            continue
        if rec.kind == NOTE:
            out.append(f"{head}  --- {rec.data.decode()}")
            continue
        if rec.kind == CLOSED:
            who = "client" if rec.direction == CLIENT_TO_SERVER else "server"
            out.append(f"{head}  === {who} closed the connection")
            continue
        if rec.kind != MESSAGE:
            continue
        obs = observers.setdefault(rec.connection, Observer())
        parsed = obs.from_client(rec.data) if rec.direction == CLIENT_TO_SERVER else obs.from_server(rec.data)
        for p in parsed:
            if p.direction == CLIENT_TO_SERVER:
                n = counters[rec.connection] = counters.get(rec.connection, 0) + 1
                text = describe_request(p.message) if p.message is not None else \
                    f"command {p.command} (undecodable: {p.error})"
                out.append(f"{head}  -> #{n:<4} {text}")
                if notes and p.message is not None and p.message.COMMAND not in seen:
                    seen.add(p.message.COMMAND)
                    out.append(f"{'':16}      ({NOTES.get(p.message.COMMAND, '')})")
                if isinstance(p.message, m.GraphComputeRequest):
                    out.extend(graph_lines(p.message, graph_nodes))
            else:
                text = describe_reply(p.message) if p.message is not None else f"({p.error})"
                out.append(f"{head}  <-       {text}")
    return "\n".join(out)


def nbytes(t: RpcTensor) -> int:
    """Bytes a tensor spans."""
    return tensor_nbytes(t.type, t.ne, t.nb)
