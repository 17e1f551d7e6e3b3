"""The server and the client over streams that are not sockets (refimpl.streams).

The same :meth:`RpcServer.serve_stream` that serves TCP connections serves a
``trio.testing`` memory stream here; bulk payloads then take the receive-and-copy path
instead of the socket's ``recv_into``.
"""

from __future__ import annotations

import ipaddress
import ssl
import time

import numpy as np
import pytest
import trio
import trio.testing

from refimpl.client import RpcClient, ServerClosedConnection
from refimpl.protocol.ggml_types import GgmlType
from refimpl.server import RpcServer
from refimpl.server.net import RECV_CHUNK
from refimpl.streams import Receiver, socket_stream_of

from .conftest import make_config

PAIRS = {"memory": trio.testing.memory_stream_pair, "lockstep": trio.testing.lockstep_stream_pair}


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
async def test_server_over_a_memory_stream(nursery, pair):
    server = RpcServer(make_config())
    client_side, server_side = pair()
    assert not Receiver(server_side).zero_copy
    done = trio.Event()

    async def serve():
        await server.serve_stream(server_side)
        done.set()

    nursery.start_soon(serve)
    client = RpcClient(client_side)
    assert await client.hello() == (7, 0, 0)
    buf = await client.alloc_buffer(4 << 20)
    t = buf.tensor(GgmlType.F32, (1 << 20,))
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    assert x.nbytes > 2 * RECV_CHUNK  # most of the payload goes through receive_into
    await client.set_tensor(t, x)
    out = np.empty_like(x)
    await client.get_tensor(t, 0, x.nbytes, out=out)
    assert np.array_equal(out, x)
    assert await client.get_tensor(t, 8, 4) == x.tobytes()[8:12]
    assert server.connections == 1

    # A refused SET_TENSOR closes the connection before its payload is read (the lockstep
    # stream's sender learns it at once, the buffered one at its next read).
    outside = buf.tensor(GgmlType.F32, (1 << 20,), offset=1 << 20)
    with pytest.raises(ServerClosedConnection):
        await client.set_tensor(outside, x)
        await client.ping()
    with trio.fail_after(5):
        await done.wait()
    assert server.connections == 0 and server.budget.used == 0
    await client.aclose()


async def test_allow_list_refuses_a_stream_without_an_address(nursery):
    server = RpcServer(make_config(allow=[ipaddress.ip_network("127.0.0.0/8")]))
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_stream, server_side)
    with pytest.raises(ServerClosedConnection):
        await RpcClient(client_side).hello()
    assert server.connections == 0


async def test_receiver_over_a_socket_reads_in_place():
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    receiver = Receiver(right)
    assert receiver.zero_copy and socket_stream_of(right) is right
    target = bytearray(10)
    await left.send_all(b"abcdef")
    n = await receiver.receive_into(memoryview(target)[2:])
    assert target[2:2 + n] == b"abcdef"[:n] and n >= 1
    await left.aclose()
    await right.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.receive_into(memoryview(target))


async def test_receiver_fallback_copies_and_sees_the_end():
    left, right = trio.testing.memory_stream_pair()
    receiver = Receiver(right)
    target = bytearray(4)
    await left.send_all(b"0123456789")
    got = bytearray()
    while len(got) < 10:
        n = await receiver.receive_into(memoryview(target))
        assert 1 <= n <= 4
        got += target[:n]
    assert got == b"0123456789"
    await left.aclose()
    assert await receiver.receive_into(memoryview(target)) == 0


async def test_tls_is_not_read_from_its_socket():
    a, b = trio.socket.socketpair()
    raw = trio.SocketStream(a)
    tls = trio.SSLStream(raw, ssl.create_default_context(), server_hostname="localhost")
    assert socket_stream_of(tls) is raw  # for the peer address and TCP_NODELAY
    assert not Receiver(tls).zero_copy   # the socket carries ciphertext
    assert socket_stream_of(trio.testing.memory_stream_pair()[0]) is None
    raw.socket.close()
    b.close()


async def test_poll_takes_bytes_that_came_and_gives_up_in_time():
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    receiver = Receiver(right)
    assert receiver.poll(64, 0.0) is None            # not asked to poll at all
    start = trio.current_time()
    assert receiver.poll(64, 0.02) is None           # nothing came: None once the time is up
    assert 0.02 <= trio.current_time() - start < 5
    await left.send_all(b"request")
    assert receiver.poll(64, 0.02) == b"request"
    await left.send_all(b"0123456789")
    assert receiver.poll(4, 0.02) == b"0123"         # at most max_bytes
    assert await receiver.receive_some(64) == b"456789"   # trio's receive still works
    await left.aclose()
    assert receiver.poll(64, 0.02) == b""            # the peer closed
    receiver.close()
    receiver.close()                                  # twice is harmless
    assert await receiver.receive_some(64) == b""    # the stream's own socket is still open
    await right.aclose()


def test_poll_is_never_tried_on_streams_that_are_not_plain_sockets():
    left, right = trio.testing.memory_stream_pair()
    start = time.monotonic()
    assert Receiver(right).poll(64, 2.0) is None
    assert time.monotonic() - start < 1.0            # at once: there is no socket to ask


async def test_poll_without_a_spare_descriptor_leaves_receiving_to_trio(monkeypatch):
    import socket

    def no_descriptor(*args):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "fromfd", no_descriptor)
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    receiver = Receiver(right)
    await left.send_all(b"request")
    assert receiver.poll(64, 0.5) is None          # no poll, no exception
    assert receiver.poll(64, 0.5) is None          # and no second try
    assert await receiver.receive_some(64) == b"request"
    receiver.close()
    await left.aclose()
    await right.aclose()
