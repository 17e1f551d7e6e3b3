"""refimpl's server in-process: every command, every refusal, limits, concurrency, cache."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trio

from refimpl.client import AllocationFailed, RpcClient, ServerClosedConnection
from refimpl.devices import CpuDevice
from refimpl.protocol import messages as m
from refimpl.protocol.constants import Command
from refimpl.hashing import fnv1a_64
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.tensor import RpcTensor
from refimpl.server import RpcServer
from refimpl.server.hash_cache import HashCache
from tools.blocking_client import BlockingClient

from .conftest import make_config
from .rawwire import HELLO, frame, open_raw, server_closes


def addr(server):
    return ("127.0.0.1", server.port)


async def connect(server) -> RpcClient:
    return await RpcClient.connect(*addr(server))


# -- the happy paths ----------------------------------------------------------------------------

async def test_handshake_and_device_queries(server):
    async with await connect(server) as c:
        assert c.server_version == (7, 0, 0)
        assert await c.device_count() == 1
        assert await c.get_alignment(0) == 32
        assert await c.get_max_size(0) == 256 << 20
        mem = await c.get_device_memory(0)
        assert 0 < mem.free <= mem.total == 256 << 20


async def test_alloc_base_set_get_free(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(1 << 20)
        assert buf.size == 1 << 20 and buf.handle != 0 and buf.base % 32 == 0
        assert (await c.get_device_memory()).free <= (256 << 20) - (1 << 20)
        t = buf.tensor(GgmlType.F32, (1024, 4))
        x = np.random.default_rng(0).standard_normal((4, 1024)).astype(np.float32)
        await c.set_tensor(t, x)
        assert np.array_equal(np.frombuffer(await c.get_tensor(t, 0, x.nbytes), np.float32),
                              x.ravel())
        await c.set_tensor(t, b"\x01\x02\x03", offset=5)
        assert await c.get_tensor(t, 4, 5) == x.tobytes()[4:5] + b"\x01\x02\x03" + x.tobytes()[8:9]
        out = np.empty(1024, np.float32)
        await c.get_tensor(t, 4096, 4096, out=out)
        assert np.array_equal(out, x[1])
        await c.free_buffer(buf.handle)
        await c.ping()
        assert (await c.get_device_memory()).free > (256 << 20) - (1 << 20) - 1


async def test_bases_are_distinct_and_handles_never_reused(server):
    async with await connect(server) as c:
        a = await c.alloc_buffer(1000)
        b = await c.alloc_buffer(1000)
        assert a.handle != b.handle
        assert a.base + a.size <= b.base or b.base + b.size <= a.base
        await c.free_buffer(a.handle)
        d = await c.alloc_buffer(1000)
        assert d.handle not in (a.handle, b.handle) and d.base != a.base


async def test_copy_clear_memset(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(4096)
        src = buf.tensor(GgmlType.F32, (256,))
        dst = buf.tensor(GgmlType.F32, (256,), offset=2048)
        data = np.arange(256, dtype=np.float32)
        await c.set_tensor(src, data)
        assert await c.copy_tensor(src, dst) is True
        assert await c.get_tensor(dst, 0, 1024) == data.tobytes()
        await c.memset_tensor(dst, 8, 4, 0xEE)
        got = await c.get_tensor(dst, 0, 16)
        assert got == data.tobytes()[:8] + b"\xee" * 4 + data.tobytes()[12:16]
        await c.buffer_clear(buf.handle, 0x11)
        assert await c.get_tensor(src, 0, 1024) == b"\x11" * 1024
        assert await c.get_tensor(dst, 1020, 4) == b"\x11" * 4


async def test_copy_overlapping_regions(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(64)
        whole = buf.tensor(GgmlType.I8, (64,))
        await c.set_tensor(whole, bytes(range(64)))
        assert await c.copy_tensor(buf.tensor(GgmlType.I8, (32,)),
                                   buf.tensor(GgmlType.I8, (32,), offset=16))
        assert await c.get_tensor(whole, 0, 64) == bytes(range(16)) + bytes(range(32)) + bytes(range(48, 64))


async def test_alloc_size_and_init_tensor(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(4096)
        q = buf.tensor(GgmlType.Q4_0, (96, 4))
        assert await c.get_alloc_size(q) == 96 // 32 * 18 * 4
        unplaced = RpcTensor(id=9, type=GgmlType.Q6_K, ne=(256, 3, 1, 1), nb=(210, 210, 630, 630))
        assert await c.get_alloc_size(unplaced, srcs=[q]) == 630
        await c.init_tensor(q)
        await c.init_tensor(unplaced)  # buffer 0: accepted and ignored
        await c.ping()


async def test_graph_fields_and_id_0_outside_graphs(server):
    """spec/graph.md, "Tensors outside graphs": id 0 is allowed, and op, op_params, flags,
    src, view_src, view_offs and use_count are ignored."""
    import dataclasses
    async with await connect(server) as c:
        buf = await c.alloc_buffer(4096)
        plain = buf.tensor(GgmlType.F32, (16,))
        odd = dataclasses.replace(plain, id=0, op=27, op_params=(7,) * 16, flags=31,
                                  src=(123,) * 10, view_src=456, view_offs=8, use_count=5)
        await c.set_tensor(odd, bytes(range(64)))
        assert await c.get_tensor(odd, 0, 64) == bytes(range(64))
        await c.memset_tensor(odd, 0, 4, 0)
        assert await c.copy_tensor(odd, buf.tensor(GgmlType.F32, (16,), offset=64))
        await c.init_tensor(odd)
        assert await c.get_tensor(plain, 0, 8) == bytes(4) + bytes(range(4, 8))
        with pytest.raises(ServerClosedConnection):  # GET_ALLOC_SIZE: id 0 is "no tensor"
            await c.get_alloc_size(odd)


async def test_zero_size_allocations_and_writes(server):
    async with await connect(server) as c:
        z = await c.alloc_buffer_raw(0)
        assert z.handle != 0 and z.size == 0
        buf = await c.alloc_buffer(64)
        t = buf.tensor(GgmlType.F32, (16,))
        await c.set_tensor(t, b"", offset=64)
        assert await c.get_tensor(t, 64, 0) == b""
        await c.memset_tensor(t, 0, 0, 1)
        await c.ping()


async def test_allocation_beyond_cap_fails_softly(nursery):
    server = await nursery.start(RpcServer(make_config(capacity=1 << 20)).serve)
    async with await connect(server) as c:
        a = await c.alloc_buffer(600 << 10)
        with pytest.raises(AllocationFailed):
            await c.alloc_buffer(600 << 10)
        reply = await c.alloc_buffer_raw(2**64 - 1)
        assert (reply.handle, reply.size) == (0, 0)
        await c.free_buffer(a.handle)
        await c.alloc_buffer(600 << 10)  # the memory came back


async def test_buffers_freed_when_client_leaves(server):
    dev = server.config.devices[0]
    async with await connect(server) as c:
        await c.alloc_buffer(8 << 20)
        assert dev.pool.reserved == 8 << 20
    with trio.fail_after(5):
        while dev.pool.reserved:
            await trio.sleep(0.01)


async def test_several_devices(nursery):
    cfg = make_config(devices=[CpuDevice(capacity=1 << 20), CpuDevice(capacity=2 << 20)])
    server = await nursery.start(RpcServer(cfg).serve)
    async with await connect(server) as c:
        assert await c.device_count() == 2
        assert (await c.get_device_memory(1)).total == 2 << 20
        b = await c.alloc_buffer(1 << 20, device=1)
        t = b.tensor(GgmlType.I32, (4,))
        await c.set_tensor(t, np.arange(4, dtype=np.int32))
        assert await c.get_tensor(t, 0, 16) == np.arange(4, dtype=np.int32).tobytes()


async def test_concurrent_clients_are_isolated(server):
    async with await connect(server) as a, await connect(server) as b:
        ba = await a.alloc_buffer(64)
        bb = await b.alloc_buffer(64)
        await a.set_tensor(ba.tensor(GgmlType.I8, (64,)), b"a" * 64)
        await b.set_tensor(bb.tensor(GgmlType.I8, (64,)), b"b" * 64)
        assert await a.get_tensor(ba.tensor(GgmlType.I8, (64,)), 0, 64) == b"a" * 64
        # b cannot reach a's buffer, even with a's exact handle and address:
        with pytest.raises(ServerClosedConnection):
            await b.get_tensor(ba.tensor(GgmlType.I8, (64,)), 0, 64)
        assert await a.get_tensor(ba.tensor(GgmlType.I8, (64,)), 0, 64) == b"a" * 64


async def test_a_stalled_upload_does_not_block_others(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(1 << 20)
        header = c._conn.send_set_tensor_header(buf.tensor(GgmlType.I8, (1 << 20,)), 0, 1 << 20)
        await c._stream.send_all(header + b"x" * 1000)  # ...and then nothing more
        with trio.fail_after(5):
            async with await connect(server) as other:
                assert await other.device_count() == 1


# -- refusals: the connection is closed, the server carries on ---------------------------------

async def assert_refused(server, payload: bytes, *, hello: bool = True):
    stream = await open_raw(addr(server), hello=hello)
    await stream.send_all(payload)
    assert await server_closes(stream), "server kept the connection open"
    await stream.aclose()
    async with await connect(server) as c:  # everyone else is still served
        assert await c.device_count() == 1


async def test_refuses_command_before_hello(server):
    await assert_refused(server, frame(Command.DEVICE_COUNT), hello=False)


@pytest.mark.parametrize("size", [0, 23, 25])
async def test_refuses_hello_of_other_sizes(server, size):
    await assert_refused(server, frame(Command.HELLO, bytes(size)), hello=False)


async def test_refuses_second_hello(server):
    await assert_refused(server, HELLO)


@pytest.mark.parametrize("cmd", [18, 19, 99, 255])
async def test_refuses_unknown_commands(server, cmd):
    await assert_refused(server, frame(cmd))


@pytest.mark.parametrize("cmd", [c for c in Command if c not in (Command.SET_TENSOR,
                                                                  Command.GRAPH_COMPUTE)])
async def test_refuses_wrong_fixed_lengths(server, cmd):
    size = m.REQUESTS[cmd].payload_size()
    await assert_refused(server, frame(cmd, bytes(size + 1)))


async def test_refuses_oversize_graph_before_reading_it(server):
    await assert_refused(server, struct.pack("<BQ", Command.GRAPH_COMPUTE, 2**63))


async def test_refuses_huge_set_tensor_from_its_header(server):
    header = m.SetTensorRequest(RpcTensor(id=1, buffer=0x100, data=0)).encode_header()
    await assert_refused(server, struct.pack("<BQ", Command.SET_TENSOR, 2**63) + header)


async def test_refuses_dead_handles(server):
    await assert_refused(server, frame(Command.BUFFER_GET_BASE, struct.pack("<Q", 0xDEAD)))
    await assert_refused(server, frame(Command.FREE_BUFFER, struct.pack("<Q", 0)))
    await assert_refused(server, frame(Command.BUFFER_CLEAR, struct.pack("<QB", 7, 0)))


async def test_refuses_unknown_device(server):
    await assert_refused(server, frame(Command.ALLOC_BUFFER, struct.pack("<IQ", 1, 16)))
    await assert_refused(server, frame(Command.GET_DEVICE_MEMORY, struct.pack("<I", 2**32 - 1)))


async def test_refuses_invalid_graphs_and_recompute_without_graph(server):
    req = m.GraphComputeRequest.from_tensors(0, [1], [RpcTensor(id=1)])  # node without buffer
    await assert_refused(server, frame(Command.GRAPH_COMPUTE, req.encode_payload()))
    await assert_refused(server, frame(Command.GRAPH_RECOMPUTE, struct.pack("<I", 0)))


async def test_refuses_truncated_message(server):
    stream = await open_raw(addr(server))
    await stream.send_all(frame(Command.ALLOC_BUFFER, bytes(12))[:15])
    await stream.send_eof()
    assert await server_closes(stream)


async def placed_buffer(c):
    buf = await c.alloc_buffer(1024)
    return buf, buf.tensor(GgmlType.F32, (64,))  # 256 bytes at the start


BAD_TENSORS = {
    "removed type": dict(type=4),
    "type out of range": dict(type=43),
    "partial block": dict(type=GgmlType.Q4_0, ne=(33, 1, 1, 1), nb=(18, 18, 18, 18)),
    "data before buffer": dict(data_delta=-32),
    "data past buffer": dict(data_delta=1024 - 128),
    "huge strides": dict(nb=(4, 2**32 - 1, 4, 4), ne=(64, 2, 1, 1)),
    "dead buffer": dict(buffer=0x9999),
    "null buffer": dict(buffer=0),
}


def corrupt(t: RpcTensor, how: dict) -> RpcTensor:
    fields = {k: v for k, v in how.items() if k != "data_delta"}
    data = t.data + how.get("data_delta", 0)
    return RpcTensor(**{**{f: getattr(t, f) for f in t.__dataclass_fields__}, **fields, "data": data})


@pytest.mark.parametrize("how", BAD_TENSORS, ids=list(BAD_TENSORS))
@pytest.mark.parametrize("command", ["set", "get", "memset", "hash", "copy_src", "copy_dst"])
async def test_refuses_bad_tensors(cached_server, how, command):
    async with await connect(cached_server) as c:
        buf, good = await placed_buffer(c)
        bad = corrupt(good, BAD_TENSORS[how])
        with pytest.raises(ServerClosedConnection):
            if command == "set":
                await c.set_tensor(bad, b"abcd")
            elif command == "get":
                await c.get_tensor(bad, 0, 4)
            elif command == "memset":
                await c.memset_tensor(bad, 0, 4, 1)
            elif command == "hash":
                await c.set_tensor_hash(bad, 0x1234)
            elif command == "copy_src":
                await c.copy_tensor(bad, good)
            else:
                await c.copy_tensor(good, bad)
            await c.ping()
    async with await connect(cached_server) as c:
        assert await c.device_count() == 1


@pytest.mark.parametrize("offset,size", [(0, 257), (256, 1), (255, 2), (2**64 - 1, 2), (4, 2**63)])
@pytest.mark.parametrize("command", ["set", "get", "memset"])
async def test_refuses_regions_outside_the_tensor(server, offset, size, command):
    async with await connect(server) as c:
        buf, t = await placed_buffer(c)  # 256-byte tensor in a 1024-byte buffer
        with pytest.raises(ServerClosedConnection):
            if command == "set":
                await c._send(c._conn.send_set_tensor_header(t, offset, size), b"x" * min(size, 300))
            elif command == "get":
                await c.get_tensor(t, offset, size, out=None) if size < 4096 else \
                    await c._call(m.GetTensorRequest(t, offset, size))
            else:
                await c.memset_tensor(t, offset, size, 0)
            await c.ping()


async def test_copy_into_too_small_a_buffer_is_refused(server):
    async with await connect(server) as c:
        big = await c.alloc_buffer(1024)
        small = await c.alloc_buffer(64)
        src = big.tensor(GgmlType.I8, (1024,))
        dst = small.tensor(GgmlType.I8, (32,), offset=32)
        with pytest.raises(ServerClosedConnection):
            await c.copy_tensor(src, dst)


async def test_get_alloc_size_refusals(server):
    async with await connect(server) as c:
        with pytest.raises(ServerClosedConnection):
            await c.get_alloc_size(RpcTensor())  # no tensor
    async with await connect(server) as c:
        bad_src = RpcTensor(id=3, type=99)
        with pytest.raises(ServerClosedConnection):
            await c.get_alloc_size(RpcTensor(id=1), srcs=[bad_src])


# -- the hash cache ------------------------------------------------------------------------------

async def test_hash_cache_miss_then_hit(cached_server, tmp_path):
    data = np.random.default_rng(3).integers(0, 255, 3 << 20, dtype=np.uint8)
    digest = fnv1a_64(data)
    async with await connect(cached_server) as c:
        buf = await c.alloc_buffer(4 << 20)
        t = buf.tensor(GgmlType.I8, (4 << 20,))
        assert await c.upload(t, data, offset=1000) is False  # miss: data sent with the flag
        await c.ping()  # SET_TENSOR has no reply: make sure the server has processed it
        assert (tmp_path / "cache" / f"{digest:016x}").read_bytes() == data.tobytes()
    async with await connect(cached_server) as c:
        buf = await c.alloc_buffer(4 << 20)
        t = buf.tensor(GgmlType.I8, (4 << 20,))
        assert await c.set_tensor_hash(t, digest, offset=1000) is True
        assert await c.get_tensor(t, 1000, data.nbytes) == data.tobytes()
        assert await c.set_tensor_hash(t, digest ^ 1) is False


async def test_unflagged_uploads_are_not_cached(cached_server, tmp_path):
    async with await connect(cached_server) as c:
        buf = await c.alloc_buffer(1 << 20)
        await c.set_tensor(buf.tensor(GgmlType.I8, (1 << 20,)), b"z" * (1 << 20))
        await c.ping()
    assert list((tmp_path / "cache").iterdir()) == []


async def test_damaged_cache_entry_is_a_miss(cached_server, tmp_path):
    data = b"weights!" * 1000
    digest = fnv1a_64(data)
    (tmp_path / "cache" / f"{digest:016x}").write_bytes(b"planted!" * 1000)
    async with await connect(cached_server) as c:
        buf = await c.alloc_buffer(len(data))
        t = buf.tensor(GgmlType.I8, (len(data),))
        assert await c.set_tensor_hash(t, digest) is False
    assert not (tmp_path / "cache" / f"{digest:016x}").exists()


async def test_cached_entry_too_large_for_the_tensor_is_refused(cached_server, tmp_path):
    data = b"q" * 5000
    HashCache(tmp_path / "cache").store(memoryview(data))
    async with await connect(cached_server) as c:
        buf = await c.alloc_buffer(8192)
        t = buf.tensor(GgmlType.I8, (4096,))
        with pytest.raises(ServerClosedConnection):
            await c.set_tensor_hash(t, fnv1a_64(data))


async def test_server_without_cache_always_misses(server):
    async with await connect(server) as c:
        buf = await c.alloc_buffer(64)
        assert await c.set_tensor_hash(buf.tensor(GgmlType.I8, (64,)), 123) is False


# -- limits -------------------------------------------------------------------------------------

async def test_connection_limit(nursery):
    server = await nursery.start(RpcServer(make_config(max_connections=2)).serve)
    async with await connect(server), await connect(server):
        with pytest.raises(ServerClosedConnection):
            async with await connect(server) as third:
                await third.ping()
    async with await connect(server) as c:  # slots free again
        assert await c.device_count() == 1


async def test_idle_timeout_closes_quiet_connections(nursery):
    server = await nursery.start(RpcServer(make_config(idle_timeout=0.3)).serve)
    stream = await open_raw(addr(server))
    with trio.fail_after(5):
        assert await server_closes(stream)


async def test_read_timeout_closes_stalled_messages(nursery):
    server = await nursery.start(RpcServer(make_config(read_timeout=0.3, idle_timeout=100)).serve)
    stream = await open_raw(addr(server))
    await stream.send_all(frame(Command.ALLOC_BUFFER, bytes(12))[:5])  # half a header
    with trio.fail_after(5):
        assert await server_closes(stream)
    async with await connect(server) as c:
        assert await c.device_count() == 1


async def test_slow_but_steady_uploads_are_fine(nursery):
    # 256 KiB in 8 pieces 0.3 s apart: never 0.5 s without a byte, and well above the
    # minimum average rate, so the whole message may take longer than the read timeout.
    server = await nursery.start(RpcServer(make_config(read_timeout=0.5)).serve)
    async with await connect(server) as c:
        size = 256 << 10
        buf = await c.alloc_buffer(size)
        t = buf.tensor(GgmlType.I8, (size,))
        header = c._conn.send_set_tensor_header(t, 0, size)
        await c._stream.send_all(header)
        for i in range(8):  # 2.4 s in all
            await trio.sleep(0.3)
            await c._stream.send_all(bytes([i]) * (size // 8))
        assert await c.get_tensor(t, 0, size) == b"".join(bytes([i]) * (size // 8) for i in range(8))


async def test_stalled_upload_payload_is_closed(nursery):
    # The payload of a SET_TENSOR is received under its own deadline (net.py,
    # _receive_payload): half of it, then silence, trips the read timeout there.
    server = await nursery.start(RpcServer(make_config(read_timeout=0.3, idle_timeout=100)).serve)
    async with await connect(server) as c:
        size = 1 << 20
        buf = await c.alloc_buffer(size)
        t = buf.tensor(GgmlType.I8, (size,))
        await c._stream.send_all(c._conn.send_set_tensor_header(t, 0, size))
        await c._stream.send_all(bytes(size // 2))
        with trio.fail_after(5):
            assert await server_closes(c._stream)
    async with await connect(server) as c:
        assert await c.device_count() == 1


async def test_slow_drip_is_closed(nursery):
    # A byte every 0.2 s never trips the per-receive read timeout, but the message as a whole
    # must arrive within the read timeout plus its size at MIN_TRANSFER_RATE.
    server = await nursery.start(RpcServer(make_config(read_timeout=0.5, idle_timeout=100)).serve)
    stream = await open_raw(addr(server))
    request = frame(Command.ALLOC_BUFFER, bytes(12))
    closed = False
    with trio.fail_after(5):
        for byte in request:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed = True
                break
            with trio.move_on_after(0.2):
                if await stream.receive_some(64) == b"":
                    closed = True
                    break
    assert closed
    async with await connect(server) as c:  # everyone else is still served
        assert await c.device_count() == 1


@pytest.mark.parametrize("networks,admitted", [(["10.0.0.0/8"], False),
                                               (["10.0.0.0/8", "127.0.0.0/8"], True)])
async def test_allow_list(nursery, networks, admitted):
    import ipaddress
    cfg = make_config(allow=[ipaddress.ip_network(n) for n in networks])
    server = await nursery.start(RpcServer(cfg).serve)
    if admitted:
        async with await connect(server) as c:
            assert await c.device_count() == 1
    else:
        with pytest.raises(ServerClosedConnection):
            await connect(server)


# -- polling for the next request (ServerConfig.poll_after_reply) --------------------------------

def _blocking_round_trips(address, count: int) -> list:
    """A client in its own thread, as llama.cpp's is in its own process: HELLO, then
    ``count`` GET_ALIGNMENTs, each sent as soon as the last reply is read; their replies."""
    client = BlockingClient(address)
    try:
        return [client.call(m.GetAlignmentRequest(0)) for _ in range(count)]
    finally:
        client.close()


@pytest.fixture
def polls(monkeypatch):
    """What each Receiver.poll returned: bytes, or None when nothing came in time."""
    from refimpl.streams import Receiver
    seen = []
    original = Receiver.poll

    def counted(self, max_bytes, seconds):
        got = original(self, max_bytes, seconds)
        seen.append(got)
        return got

    monkeypatch.setattr(Receiver, "poll", counted)
    return seen


async def test_next_request_after_a_reply_is_taken_by_polling(nursery, polls):
    server = await nursery.start(RpcServer(make_config(poll_after_reply=2.0)).serve)
    replies = await trio.to_thread.run_sync(_blocking_round_trips, addr(server), 20)
    assert [r.alignment for r in replies] == [CpuDevice().alignment] * 20
    # After each of the 21 replies the server polled; the client sent its next request (or
    # closed) well within two seconds, so every poll found it without waiting in trio.
    with trio.fail_after(5):
        while server.connections:
            await trio.sleep(0.01)
    assert len(polls) == 21 and all(got is not None for got in polls)
    assert polls[-1] == b""   # the client closed


async def test_no_polling_while_another_client_is_connected(nursery, polls):
    server = await nursery.start(RpcServer(make_config(poll_after_reply=0.3)).serve)
    async with await connect(server) as idle:
        await idle.ping()
        # Alone, it has a poll after each reply (HELLO's, the ping's), which finds nothing:
        # its client runs in the loop that the poll holds.  trio may run the client before
        # the server's poll after the ping's reply: wait out the poll's 0.3 s.
        await trio.sleep(0.5)
        assert polls == [None, None]
        polls.clear()
        replies = await trio.to_thread.run_sync(_blocking_round_trips, addr(server), 5)
        assert len(replies) == 5 and polls == []


async def test_polling_off(nursery, polls):
    server = await nursery.start(RpcServer(make_config(poll_after_reply=0.0)).serve)
    replies = await trio.to_thread.run_sync(_blocking_round_trips, addr(server), 5)
    assert len(replies) == 5 and polls == []
