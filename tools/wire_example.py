"""The worked GRAPH_COMPUTE example of spec/graph.md, made by refimpl's own encoder.

    python -m tools.wire_example        # print the annotated dump that spec/graph.md quotes

One ADD node ``c = a + b`` over two F32 vectors of four elements, as a client sends it once
its allocator has placed all three tensors in one buffer (handle 0x100 at 0x1_0000_0000, the
first buffer refimpl-server hands out).  ``tests/test_spec_drift.py`` re-encodes it and
compares it with the spec, byte by byte and line by line.
"""

from __future__ import annotations

import dataclasses

from refimpl.graph.ops import Op
from refimpl.protocol.connection import ClientConnection, hello_request
from refimpl.protocol.constants import Command
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.messages import GRAPH_HEADER, GraphComputeRequest
from refimpl.protocol.tensor import RPC_TENSOR

from .graphs import GraphBuilder

#: ggml's enum ggml_tensor_flag (spec/graph.md, "Tensor flags").
FLAG_NAMES = {1: "INPUT", 2: "OUTPUT", 4: "PARAM", 8: "LOSS", 16: "COMPUTE"}


def add_graph() -> GraphComputeRequest:
    """The example's request: inputs ``a`` and ``b`` (flag INPUT, each used once), node ``c``
    (flags OUTPUT | COMPUTE, used by nothing)."""
    g = GraphBuilder(arena_bytes=1 << 20)
    a = g.input(GgmlType.F32, (4,), name="a")
    b = g.input(GgmlType.F32, (4,), name="b")
    c = g.node(Op.ADD, GgmlType.F32, (4,), [a, b], name="c")
    tensors = [dataclasses.replace(a, flags=1, use_count=1),
               dataclasses.replace(b, flags=1, use_count=1),
               dataclasses.replace(c, flags=2 | 16, use_count=0)]
    return GraphComputeRequest.from_tensors(0, g.nodes, tensors)


def add_graph_frame() -> bytes:
    """The whole request on the wire: command byte, u64 length, payload."""
    conn = ClientConnection()
    conn.send(hello_request())  # a connection speaks HELLO first
    return conn.send(add_graph())


def _flags(value: int) -> str:
    names = [name for bit, name in FLAG_NAMES.items() if value & bit]
    return " | ".join(names) or "none"


def _describe(name: str, values, tensor_names: dict[int, str]) -> str:
    """What one rpc_tensor field holds, in words."""
    ref = lambda v: f"{tensor_names[v]} (id {v})" if v else "0"
    if name == "type":
        return f"type {values} = {GgmlType(values).name}"
    if name == "op":
        return f"op {values} = {Op(values).name}"
    if name == "flags":
        return f"flags {values} = {_flags(values)}"
    if name in ("buffer", "data", "id"):
        return f"{name} {values:#x}" if name != "id" else f"id {values}"
    if name == "name":
        text = bytes(values).split(b"\0", 1)[0].decode()
        return f'name "{text}", NUL-padded'
    if name == "src":
        used = [ref(v) for v in values if v]
        return "src: " + (", ".join(used) + ", then 0s" if used else "all 0")
    if name == "view_src":
        return f"view_src {ref(values)}"
    if isinstance(values, (list, tuple)):
        return f"{name} {list(values)}" if any(values) else f"{name}: all 0"
    return f"{name} {values}"


def _hex(data: bytes) -> str:
    """Bytes as hex pairs; a run of one byte value longer than 8 is written ``00 ×N``."""
    out, i = [], 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        if j - i > 8:
            out.append(f"{data[i]:02x} ×{j - i}")
            i = j
        else:
            out.append(f"{data[i]:02x}")
            i += 1
    return " ".join(out)


def annotated_dump(frame: bytes | None = None) -> str:
    """The example as spec/graph.md prints it: ``offset  bytes  meaning`` per field."""
    frame = add_graph_frame() if frame is None else frame
    req = GraphComputeRequest.decode_payload(frame[9:])
    names = {int(r["id"]): bytes(r["name"]).split(b"\0", 1)[0].decode() for r in req.tensors}
    rows: list[tuple[int, bytes, str]] = []
    at = 0

    def row(size: int, meaning: str) -> None:
        nonlocal at
        rows.append((at, frame[at:at + size], meaning))
        at += size

    row(1, f"command {frame[0]} = {Command(frame[0]).name}")
    row(8, f"length {len(frame) - 9} (u64)")
    for f in GRAPH_HEADER.fields:
        row(f.size, f"{f.name} {int.from_bytes(frame[at:at + f.size], 'little')}")
    for i, nid in enumerate(req.nodes.tolist()):
        row(8, f"nodes[{i}] = {names[nid]} (id {nid})")
    row(4, f"n_tensors {len(req.tensors)}")
    for i in range(len(req.tensors)):
        t = req.tensor(i)
        for f in RPC_TENSOR.fields:
            text = _describe(f.name, getattr(t, f.name), names)
            row(f.size, (f"tensors[{i}] = {names[t.id]}: " if f.name == "id" else "  ") + text)
    assert at == len(frame)
    width = max(len(_hex(data)) for _, data, _ in rows)
    return "\n".join(f"{offset:04x}  {_hex(data):{width}}  {meaning}".rstrip()
                     for offset, data, meaning in rows)


def parse_dump(text: str) -> bytes:
    """The bytes of a dump in :func:`annotated_dump`'s format (offsets checked)."""
    out = bytearray()
    for line in text.strip("\n").splitlines():
        offset, rest = line.split("  ", 1)
        assert int(offset, 16) == len(out), f"offset {offset} but {len(out)} bytes so far"
        hex_part = rest.strip().split("  ", 1)[0]
        tokens = hex_part.split()
        for k, tok in enumerate(tokens):
            if tok.startswith("×"):
                continue
            count = int(tokens[k + 1][1:]) if k + 1 < len(tokens) and tokens[k + 1].startswith("×") else 1
            out += bytes([int(tok, 16)]) * count
    return bytes(out)


if __name__ == "__main__":
    print(annotated_dump())
