"""Protocol versions other than 7.0.0: per-profile codecs, a server started with
``--protocol``, the version rule at HELLO, and graph op numbers read through the profile's
op table (spec/versions.md, issue 7)."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.client import RpcClient, ServerClosedConnection, VersionMismatch
from refimpl.graph.ops import Op, UnaryOp, GluOp, wire_number
from refimpl.protocol import compat
from refimpl.protocol import messages as m
from refimpl.protocol.connection import (ClientConnection, ServerConnection, SetTensorStart,
                                         hello_request)
from refimpl.protocol.constants import Command
from refimpl.protocol.errors import HandshakeError, UnknownCommand
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.profiles import LATEST, PROFILES, SERVED, served_profile
from refimpl.server import RpcServer
from tools.processes import ServerProcess
from tools.strategies import REQUEST_STRATEGIES, RESPONSE_STRATEGIES

from .conftest import make_config
from .rawwire import frame, read_exactly, server_closes
from .test_cli import run_cli

V5, V402, V361 = PROFILES[(5, 0, 0)], PROFILES[(4, 0, 2)], PROFILES[(3, 6, 1)]
SERVED_NAMES = [p.name for p in SERVED.values()]


def test_served_versions():
    assert SERVED_NAMES == ["3.0.0", "3.5.0", "3.6.0", "3.6.1", "4.0.0", "4.0.1", "4.0.2",
                            "4.0.3", "5.0.0", "5.1.0", "7.0.0"]
    assert LATEST.version in SERVED
    with pytest.raises(KeyError, match="served: 3.0.0"):
        served_profile("6.0.0")


# -- codecs ------------------------------------------------------------------------------------

def _requests(profile):
    return [c for c in REQUEST_STRATEGIES if c.COMMAND.name in profile.commands]


@pytest.mark.parametrize("name", SERVED_NAMES)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_request_round_trip_per_profile(name, data):
    """Encode and decode under each profile, through both connection ends."""
    p = served_profile(name)
    cls = data.draw(st.sampled_from(_requests(p)))
    msg = data.draw(REQUEST_STRATEGIES[cls])
    client, server = ClientConnection(profile=p), ServerConnection(profile=p)
    wire = client.send(hello_request())
    if cls is not m.HelloRequest:
        server.receive_data(wire)
        server.next_event()
        if compat.has_response(Command.HELLO, p):
            server.send(m.HelloResponse(*p.version))
        wire = client.send(msg)
    payload = compat.encode(msg, p)
    size = compat.payload_size(cls, p)
    assert size is None or len(payload) == size
    again = compat.decode(cls, payload, p)
    assert compat.encode(again, p) == payload
    if cls is m.HelloRequest and p.hello_request_size == 0:
        assert again == m.HelloRequest()
    elif cls is m.SetTensorRequest and p.set_tensor_header_size == 304:
        assert again == dataclasses.replace(msg, cache_flag=0)
    elif cls is m.GetAllocSizeRequest and p.get_alloc_size_request_size == 300:
        # before 3.6.0 the sources are not sent: they decode as absent (id 0) tensors
        assert again == dataclasses.replace(msg, srcs=again.srcs)
        assert all(t.id == 0 for t in again.srcs)
    else:
        assert again == msg
    if cls is m.HelloRequest:
        return
    server.receive_data(wire)
    event = server.next_event()
    if isinstance(event, SetTensorStart):
        assert (event.tensor, event.offset, event.size) == (msg.tensor, msg.offset, len(msg.data))
        assert event.cache_flag == (msg.cache_flag if p.set_tensor_header_size == 305 else 0)
    else:
        assert compat.encode(event, p) == payload


@pytest.mark.parametrize("name", SERVED_NAMES)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_response_round_trip_per_profile(name, data):
    p = served_profile(name)
    cls = data.draw(st.sampled_from(list(RESPONSE_STRATEGIES)))
    msg = data.draw(RESPONSE_STRATEGIES[cls])
    payload = compat.encode(msg, p)
    again = compat.decode(cls, payload, p)
    assert compat.encode(again, p) == payload
    if cls is m.HelloResponse and p.hello_response_size == 3:
        assert len(payload) == 3 and again == m.HelloResponse(msg.major, msg.minor, msg.patch)
    else:
        assert again == msg


def test_layout_differences():
    t = m.RpcTensor(id=5)
    st7 = m.SetTensorRequest(t, 9, b"ab", 1)
    assert len(compat.encode(st7)) == 305 + 2
    assert compat.encode(st7, V5) == t.encode() + struct.pack("<Q", 9) + b"ab"
    assert compat.encode(m.HelloRequest(), V361) == b""
    assert compat.encode(m.HelloResponse(3, 6, 1), V361) == bytes([3, 6, 1])
    assert len(compat.encode(m.HelloResponse(5, 0, 0), V5)) == 28


def _hello_server(p):
    server = ServerConnection(profile=p)
    server.receive_data(frame(Command.HELLO, bytes(p.hello_request_size)))
    assert isinstance(server.next_event(), m.HelloRequest)
    reply = server.send(m.HelloResponse(*p.version))
    assert len(reply) == 8 + p.hello_response_size
    return server


def test_server_connection_rules_per_profile():
    # 4.x has no MEMSET_TENSOR: 17 is an unknown command.
    server = _hello_server(V402)
    server.receive_data(frame(Command.MEMSET_TENSOR, bytes(313)))
    with pytest.raises(UnknownCommand):
        server.next_event()
    # 5.0.0 answers FREE_BUFFER with an empty reply.
    server = _hello_server(V5)
    server.receive_data(frame(Command.FREE_BUFFER, bytes(8)))
    assert isinstance(server.next_event(), m.FreeBufferRequest)
    assert server.send(compat.EmptyReply(Command.FREE_BUFFER)) == bytes(8)
    # Each side of the 3.x / 4.x boundary closes on the other's HELLO.
    for p, length in ((V361, 24), (V5, 0)):
        server = ServerConnection(profile=p)
        server.receive_data(frame(Command.HELLO, bytes(length)))
        with pytest.raises(HandshakeError):
            server.next_event()


def test_client_connection_empty_reply():
    client = ClientConnection(profile=V5)
    client.send(hello_request())
    client.receive_data(struct.pack("<Q", 28) + bytes([5, 0, 0, 0]) + bytes(24))
    assert client.next_event() == m.HelloResponse(5, 0, 0)
    client.send(m.MemsetTensorRequest())
    assert client.pending == 1
    client.receive_data(bytes(8))
    assert client.next_event() == compat.EmptyReply(Command.MEMSET_TENSOR)


# -- a server speaking another version ---------------------------------------------------------

async def _serve(nursery, name, op_table=None):
    p = served_profile(name)
    p = p.with_op_table(op_table) if op_table else p
    return await nursery.start(RpcServer(make_config(profile=p)).serve)


def _addr(server):
    return ("127.0.0.1", server.port)


async def _exercise(c: RpcClient):
    buf = await c.alloc_buffer(4096)
    t = buf.tensor(GgmlType.F32, (16,))
    data = np.arange(16, dtype=np.float32)
    await c.set_tensor(t, data, cache=True)
    assert np.array_equal(np.frombuffer(await c.get_tensor(t, 0, 64), np.float32), data)
    if "MEMSET_TENSOR" in c.profile.commands:
        await c.memset_tensor(t, 0, 8, 0)
        data[:2] = 0
    await c.init_tensor(t)
    assert np.array_equal(np.frombuffer(await c.get_tensor(t, 0, 64), np.float32), data)
    await c.buffer_clear(buf.handle, 0)
    assert await c.get_tensor(t, 0, 64) == bytes(64)
    await c.free_buffer(buf.handle)
    assert await c.device_count() == 1


@pytest.mark.parametrize("name", SERVED_NAMES)
async def test_server_of_each_version_serves_its_clients(nursery, name):
    server = await _serve(nursery, name)
    async with await RpcClient.connect(*_addr(server), protocol=name) as c:
        assert c.server_version == served_profile(name).version
        await _exercise(c)


async def test_major_version_rule(nursery):
    v5 = await _serve(nursery, "5.0.0")
    v7 = await _serve(nursery, "7.0.0")
    # Same HELLO shape, so the server answers; the client refuses the other major.
    with pytest.raises(VersionMismatch) as info:
        await RpcClient.connect(*_addr(v5))
    assert info.value.server_version == (5, 0, 0)
    with pytest.raises(VersionMismatch):
        await RpcClient.connect(*_addr(v7), protocol="5.0.0")
    with pytest.raises(VersionMismatch):
        await RpcClient.connect(*_addr(v5), protocol="4.0.2")
    # "auto" learns the version from HELLO and reconnects speaking it.
    async with await RpcClient.connect(*_addr(v5), protocol="auto") as c:
        assert c.profile.version == (5, 0, 0)
        await _exercise(c)


async def test_hello_length_separates_3x_and_4x(nursery):
    v361 = await _serve(nursery, "3.6.1")
    with pytest.raises(ServerClosedConnection):
        await RpcClient.connect(*_addr(v361))
    stream = await trio.open_tcp_stream(*_addr(v361))
    await stream.send_all(frame(Command.HELLO))
    assert await read_exactly(stream, 11) == struct.pack("<Q", 3) + bytes([3, 6, 1])
    await stream.aclose()
    v5 = await _serve(nursery, "5.0.0")
    stream = await trio.open_tcp_stream(*_addr(v5))
    await stream.send_all(frame(Command.HELLO))
    assert await server_closes(stream)
    await stream.aclose()


@pytest.mark.parametrize("name", ["3.0.0", "3.6.0", "3.6.1", "4.0.2", "5.1.0", "7.0.0"])
async def test_auto_learns_every_version(nursery, name):
    # A 3.x server closes on the 24-byte HELLO, so "auto" then tries the empty one; a 3.0.0
    # server would be accepted by a 3.6.1 client (minor not greater), so "auto" reconnects
    # speaking exactly the version announced.
    server = await _serve(nursery, name)
    async with await RpcClient.connect(*_addr(server), protocol="auto") as c:
        assert c.profile.name == name and c.server_version == c.profile.version
        await _exercise(c)


def test_cli_protocol_flag():
    with ServerProcess("refimpl", args=["--protocol", "5.0.0"]) as srv:
        trio.run(_cli_clients, srv)
        text = srv.log_text()
    assert "Starting RPC server v5.0.0" in text
    proc = run_cli("--protocol", "6.0.0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "6.0.0" in proc.stderr and ", ".join(SERVED_NAMES) in proc.stderr


async def _cli_clients(srv):
    async with await RpcClient.connect(*srv.address, protocol="5.0.0") as c:
        assert c.server_version == (5, 0, 0)
        await _exercise(c)
    with pytest.raises(VersionMismatch):
        await RpcClient.connect(*srv.address)


# -- graph op numbers through the profile ------------------------------------------------------

async def _unary_graph(c: RpcClient, op_number: int, sub: int, *, glu=False):
    """out = op(x) (UNARY, or GLU of x with itself) with ``op_number`` on the wire."""
    buf = await c.alloc_buffer(4096)
    x = buf.tensor(GgmlType.F32, (8,), name="x")
    out = buf.tensor(GgmlType.F32, (8,), offset=256, name="out")
    params = (sub,) + (0,) * 15
    srcs = (x.id, x.id if glu else 0) + (0,) * 8
    out = dataclasses.replace(out, op=op_number, op_params=params, src=srcs)
    xs = np.linspace(-2, 2, 8, dtype=np.float32)
    await c.set_tensor(x, xs)
    await c.graph_compute(0, [out.id], [x, out])
    got = np.frombuffer(await c.get_tensor(out, 0, 32), np.float32)
    return xs, got


@pytest.mark.parametrize("name, table", [
    ("3.0.0", "3.0.0-90"), ("3.0.0", "3.0.0-94"), ("3.0.0", "3.0.0-95"), ("3.5.0", None),
    ("3.6.0", "3.6.0-95"), ("3.6.0", "3.6.0-96"), ("4.0.0", None), ("4.0.2", None),
    ("4.0.3", None), ("5.0.0", None), ("5.1.0", None), ("7.0.0", None)])
async def test_graph_ops_numbered_by_the_profile(nursery, name, table):
    p = served_profile(name)
    p = p.with_op_table(table) if table else p
    server = await _serve(nursery, name, table)
    async with await RpcClient.connect(*_addr(server), protocol=name) as c:
        wire = wire_number(p, Op.UNARY)
        assert (wire == Op.UNARY) == (p.ops == LATEST.ops)
        xs, got = await _unary_graph(c, wire, p.unary_ops["NEG"])
        assert np.array_equal(got, -xs)
        # The newest numbering of the same op is refused where it means something else.
        if wire != Op.UNARY:
            with pytest.raises(ServerClosedConnection):
                await _unary_graph(c, int(Op.UNARY), int(UnaryOp.NEG))
                await c.ping()


async def test_graph_refuses_ops_the_version_lacks(nursery):
    server = await _serve(nursery, "5.0.0")
    async with await RpcClient.connect(*_addr(server), protocol="5.0.0") as c:
        xs, got = await _unary_graph(c, wire_number(V5, Op.GLU), int(GluOp.REGLU), glu=True)
        assert np.array_equal(got, np.maximum(xs, 0) * xs)
        # SWIGLU_CLAMP came after 5.0.0.
        with pytest.raises(ServerClosedConnection):
            await _unary_graph(c, wire_number(V5, Op.GLU), int(GluOp.SWIGLU_CLAMP), glu=True)
            await c.ping()


def _malformed_for(p) -> dict[str, bytes]:
    """Requests a server of profile ``p`` must refuse by closing (spec/errors.md), built from
    the profile's own sizes and command numbers."""
    cmds = p.commands
    cases = {
        "unknown command": frame(p.command_limit, b""),
        "SET_TENSOR shorter than its header": frame(cmds["SET_TENSOR"],
                                                    bytes(p.set_tensor_header_size - 1)),
        "GET_ALLOC_SIZE of the wrong size": frame(cmds["GET_ALLOC_SIZE"],
                                                  bytes(p.get_alloc_size_request_size + 1)),
        "length prefix of 2^64-1": struct.pack("<BQ", cmds["SET_TENSOR"], 2**64 - 1),
        "second HELLO": frame(cmds["HELLO"], bytes(p.hello_request_size)),
    }
    if "MEMSET_TENSOR" not in cmds:  # a 7.0.0 command this version lacks
        cases["MEMSET_TENSOR of 7.0.0"] = frame(LATEST.commands["MEMSET_TENSOR"], bytes(312))
    return cases


@pytest.mark.parametrize("name", SERVED_NAMES)
async def test_malformed_requests_per_version_close_only_that_connection(nursery, name):
    """Every served version refuses bad input by closing the one connection, per its own
    layouts, and goes on serving (the 7.0.0 cases in test_server.py, for each profile)."""
    p = served_profile(name)
    server = await _serve(nursery, name)
    for what, data in _malformed_for(p).items():
        stream = await trio.open_tcp_stream(*_addr(server))
        await stream.send_all(frame(p.commands["HELLO"], bytes(p.hello_request_size)))
        reply = await read_exactly(stream, 8 + p.hello_response_size)
        assert reply[8:11] == bytes(p.version), what
        await stream.send_all(data)
        assert await server_closes(stream), f"{name}: {what} did not close the connection"
        await stream.aclose()
        async with await RpcClient.connect(*_addr(server), protocol=name) as c:
            assert await c.device_count() == 1, what
