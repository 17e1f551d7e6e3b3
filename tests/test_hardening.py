"""Regression tests for the weaknesses the hazard probes and the fuzzer found in refimpl
(spec/hazards.md X1, X2, H19, H20m, H24d, H30d) and for the limits that close them
(docs/limits.md)."""

from __future__ import annotations

import os
import struct
import time

import pytest
import trio

from refimpl.client import RpcClient
from refimpl.devices import CpuDevice
from refimpl.graph import GraphInvalid, Op, build_graph
from refimpl.graph.engine import GraphExecutor
from refimpl.protocol import messages as m
from refimpl.protocol.connection import ServerConnection
from refimpl.protocol.constants import Command
from refimpl.protocol.errors import OversizeMessage
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.tensor import RpcTensor
from refimpl.server import RpcServer
from refimpl.server import hash_cache as hc
from refimpl.buffers import BufferTable, Rejected
from refimpl.server.cli import build_parser, make_config
from refimpl.server.net import MemoryBudget

from .conftest import make_config as make_test_config
from .rawwire import HELLO, frame, open_raw, read_exactly, server_closes


def addr(server):
    return ("127.0.0.1", server.port)


# -- X1: a computed node's elements must occupy distinct bytes ---------------------------------

def _table():
    dev = CpuDevice(capacity=1 << 20)
    table = BufferTable([dev])
    return table, table.add(0, dev.allocate(1024))


@pytest.mark.parametrize("nb", [(4, 0, 0, 0), (4, 4, 64, 64), (0, 64, 64, 64)])
def test_overlapping_destination_is_refused(nb):
    table, buf = _table()
    ne = (16, 1 << 20, 1 << 10, 1 << 4) if nb[1] == 0 else (16, 4, 1, 1)
    mk = lambda i, at, **kw: RpcTensor(id=i, type=GgmlType.F32, buffer=buf.handle, ne=ne,  # noqa
                                       nb=nb, data=buf.base + at, **kw)
    req = m.GraphComputeRequest.from_tensors(0, [3], [
        mk(1, 0), mk(2, 256), mk(3, 512, op=Op.ADD, src=(1, 2) + (0,) * 8, flags=16)])
    with pytest.raises(GraphInvalid, match="overlap"):
        build_graph(req, table)


def test_zero_strided_sources_are_still_fine():
    """Only results must not overlap: a source may repeat bytes (a broadcast view)."""
    table, buf = _table()
    src = RpcTensor(id=1, type=GgmlType.F32, buffer=buf.handle, ne=(4, 4, 1, 1), nb=(4, 0, 16, 16),
                    data=buf.base)
    dst = RpcTensor(id=2, type=GgmlType.F32, buffer=buf.handle, ne=(4, 4, 1, 1),
                    nb=(4, 16, 64, 64), data=buf.base + 64, op=Op.SCALE, src=(1,) + (0,) * 9,
                    flags=16, op_params=(struct.unpack("<i", struct.pack("<f", 2.0))[0],) + (0,) * 15)
    build_graph(m.GraphComputeRequest.from_tensors(0, [2], [src, dst]), table)


# -- H19: a SET_TENSOR length no buffer can take is refused from its header ---------------------

def test_set_tensor_length_beyond_any_buffer_is_refused_at_once():
    conn = ServerConnection(max_tensor_data=1 << 20)
    conn.receive_data(HELLO)
    assert isinstance(conn.next_event(), m.HelloRequest)
    conn.send(m.HelloResponse(7, 0, 0, 0, bytes(24)))
    conn.receive_data(struct.pack("<BQ", Command.SET_TENSOR, 2**64 - 1))
    with pytest.raises(OversizeMessage):
        conn.next_event()


def test_set_tensor_up_to_the_largest_buffer_is_accepted():
    conn = ServerConnection(max_tensor_data=1 << 20)
    conn.receive_data(HELLO)
    conn.next_event()
    conn.send(m.HelloResponse(7, 0, 0, 0, bytes(24)))
    conn.receive_data(struct.pack("<BQ", Command.SET_TENSOR, 305 + (1 << 20)) + bytes(305))
    start = conn.next_event()
    assert start.size == 1 << 20


# -- H20m: memory held by requests is bounded across connections --------------------------------

def test_memory_budget_refuses_beyond_capacity_and_lowers_freely():
    b = MemoryBudget(100)
    b.charge(1, 60)
    b.charge(2, 40)
    with pytest.raises(Rejected, match="max-buffered-mib"):
        b.charge(3, 1)
    b.charge(1, 10)          # lowering always works
    b.charge(3, 50)
    b.release(2)
    assert b.used == 60


async def test_partial_messages_of_many_clients_share_one_budget(nursery):
    server = await nursery.start(RpcServer(make_test_config(max_buffered=3 << 20)).serve)
    size = 2 << 20
    head = struct.pack("<BQ", Command.GRAPH_COMPUTE, size) + struct.pack("<III", 0, 0, 0)
    first = await open_raw(addr(server))
    await first.send_all(head + bytes(size - 12 - 1))     # 2 MiB held, one byte short
    await trio.sleep(0.2)
    second = await open_raw(addr(server))
    await second.send_all(head)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(8):
            await second.send_all(bytes(1 << 18))
            await trio.sleep(0.01)
    assert await server_closes(second)
    assert server.budget.used >= size - 13
    await first.aclose()
    async with await RpcClient.connect(*addr(server)) as c:   # others are still served
        assert await c.device_count() == 1
    with trio.fail_after(5):
        while server.budget.used:
            await trio.sleep(0.05)


async def test_stored_graphs_are_charged_until_freed(nursery):
    server = await nursery.start(RpcServer(make_test_config()).serve)
    async with await RpcClient.connect(*addr(server)) as c:
        buf = await c.alloc_buffer(64)
        t = RpcTensor(id=1, type=GgmlType.F32, buffer=buf.handle, ne=(4, 1, 1, 1),
                      nb=(4, 16, 16, 16), data=buf.base)
        await c.graph_compute(0, [1], [t])
        await c.device_count()
        assert server.budget.used >= 1024   # one stored tensor
        await c.free_buffer(buf.handle)
        await c.device_count()
        assert server.budget.used == 0


def test_executor_reports_what_it_keeps():
    ex = GraphExecutor([CpuDevice(capacity=1 << 20)])
    assert ex.stored_bytes() == 0
    req = m.GraphComputeRequest.from_tensors(0, [1], [RpcTensor(id=1)] * 1)
    assert ex.request_bytes(req) > 296


# -- X2: empty buffers cost memory too, so their number is bounded ------------------------------

async def test_buffers_per_connection_are_bounded(nursery):
    server = await nursery.start(RpcServer(make_test_config(max_buffers=8)).serve)
    stream = await open_raw(addr(server))
    await stream.send_all(frame(Command.ALLOC_BUFFER, struct.pack("<IQ", 0, 0)) * 10)
    replies = await read_exactly(stream, 24 * 10)
    handles = [struct.unpack_from("<Q", replies, 24 * i + 8)[0] for i in range(10)]
    assert all(handles[:8]) and handles[8:] == [0, 0]
    await stream.send_all(frame(Command.DEVICE_COUNT))      # refused softly: still connected
    assert await read_exactly(stream, 12) == struct.pack("<QI", 4, 1)


# -- H30d: the hash cache is bounded ------------------------------------------------------------

def test_cache_evicts_least_recently_used(tmp_path):
    cache = hc.HashCache(tmp_path, max_bytes=3000)
    paths = [cache.store(memoryview(bytes([i]) * 1000)) for i in range(3)]
    old = time.time() - 100
    os.utime(paths[1], (old, old - 10))
    os.utime(paths[0], (old, old))
    os.utime(paths[2], (old, old + 10))
    cache.store(memoryview(b"x" * 1000))
    assert not paths[1].exists() and paths[0].exists() and paths[2].exists()
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 3000


def test_cache_refuses_entries_larger_than_its_bound(tmp_path):
    cache = hc.HashCache(tmp_path, max_bytes=100)
    assert cache.store(memoryview(bytes(101))) is None
    assert list(tmp_path.iterdir()) == []


def test_cache_keeps_the_disk_from_filling(tmp_path, monkeypatch):
    cache = hc.HashCache(tmp_path, max_bytes=1 << 40)
    usage = hc.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(hc.shutil, "disk_usage",
                        lambda p: usage._replace(free=hc.MIN_FREE_DISK + 10))
    assert cache.store(memoryview(bytes(100))) is None


def test_cache_removes_leftover_partial_files(tmp_path):
    (tmp_path / ".incoming-abc").write_bytes(b"half")
    hc.HashCache(tmp_path, max_bytes=1 << 20)
    assert not (tmp_path / ".incoming-abc").exists()


def test_default_cache_bound_is_half_the_free_space(tmp_path):
    assert hc.default_cache_limit(tmp_path) == hc.shutil.disk_usage(tmp_path).free // 2


# -- the command line ---------------------------------------------------------------------------

def test_limit_flags_reach_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    args = build_parser().parse_args(["-m", "64", "-c", "--cache-max-mib", "5",
                                      "--max-buffered-mib", "32", "--max-buffers", "9"])
    cfg, cache_dir = make_config(args)
    assert cfg.cache.max_bytes == 5 << 20 and cfg.max_buffered == 32 << 20
    assert cfg.max_buffers == 9


@pytest.mark.parametrize("flag", ["--max-buffered-mib", "--max-buffers", "--cache-max-mib"])
def test_negative_limits_are_refused(flag):
    args = build_parser().parse_args([flag, "-1"])
    with pytest.raises(ValueError):
        make_config(args)
