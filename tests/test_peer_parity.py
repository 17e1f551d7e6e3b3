"""The same assertions against refimpl-server and llama.cpp's ggml-rpc-server (0.3.36, 7.0.0).

Each test gets a fresh server process of each kind; the hash cache is on (``-c``) in a
private directory.  These tests need the real peers and fail, never skip, without them.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.client import RpcClient
from refimpl.hashing import fnv1a_64
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.tensor import RpcTensor

pytestmark = pytest.mark.peer


async def connect(srv) -> RpcClient:
    return await RpcClient.connect(*srv.address)


async def test_handshake_version(any_server):
    async with await connect(any_server) as c:
        assert c.server_version == (7, 0, 0)
        assert await c.device_count() == 1


async def test_device_properties(any_server):
    async with await connect(any_server) as c:
        align = await c.get_alignment(0)
        assert align >= 8 and align & (align - 1) == 0
        assert await c.get_max_size(0) >= 1 << 30
        mem = await c.get_device_memory(0)
        assert 0 < mem.free <= mem.total


async def test_alloc_and_base(any_server):
    async with await connect(any_server) as c:
        align = await c.get_alignment(0)
        a = await c.alloc_buffer(100_000)
        b = await c.alloc_buffer(4096)
        assert a.size >= 100_000 and b.size >= 4096
        assert a.handle and b.handle and a.handle != b.handle
        assert a.base % align == 0 and b.base % align == 0
        assert a.base + a.size <= b.base or b.base + b.size <= a.base


async def test_set_get_round_trip(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(1 << 20)
        t = buf.tensor(GgmlType.F32, (512, 512))
        x = np.random.default_rng(7).standard_normal((512, 512)).astype(np.float32)
        await c.set_tensor(t, x)
        assert await c.get_tensor(t, 0, x.nbytes) == x.tobytes()
        await c.set_tensor(t, b"\xff" * 10, offset=1000)
        assert await c.get_tensor(t, 996, 18) == x.tobytes()[996:1000] + b"\xff" * 10 + x.tobytes()[1010:1014]


async def test_copy(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(8192)
        src = buf.tensor(GgmlType.F16, (1024,))
        dst = buf.tensor(GgmlType.F16, (1024,), offset=4096)
        x = np.arange(1024, dtype=np.float16)
        await c.set_tensor(src, x)
        assert await c.copy_tensor(src, dst) is True
        assert await c.get_tensor(dst, 0, 2048) == x.tobytes()


async def test_clear(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(4096)
        t = buf.tensor(GgmlType.I8, (4096,))
        await c.set_tensor(t, bytes(range(256)) * 16)
        await c.buffer_clear(buf.handle, 0x3C)
        assert await c.get_tensor(t, 0, 4096) == b"\x3c" * 4096


async def test_memset(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(1024)
        t = buf.tensor(GgmlType.I8, (1024,))
        await c.set_tensor(t, b"\x01" * 1024)
        await c.memset_tensor(t, 100, 50, 0x77)
        got = await c.get_tensor(t, 0, 1024)
        assert got == b"\x01" * 100 + b"\x77" * 50 + b"\x01" * 874


async def test_alloc_size(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(1 << 16)
        q = buf.tensor(GgmlType.Q4_0, (96, 7))
        assert await c.get_alloc_size(q) == 3 * 18 * 7
        loose = RpcTensor(id=5, type=GgmlType.Q8_0, ne=(64, 3, 1, 1), nb=(34, 68, 204, 204))
        assert await c.get_alloc_size(loose) == 204


async def test_init_tensor_and_free(any_server):
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(1 << 16)
        await c.init_tensor(buf.tensor(GgmlType.Q4_0, (96, 7)))
        await c.free_buffer(buf.handle)
        await c.ping()


async def test_hash_cache_miss_then_hit(any_server):
    data = np.random.default_rng(11).integers(0, 256, (11 << 20) + 5, dtype=np.uint8)
    digest = fnv1a_64(data)
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(12 << 20)
        t = buf.tensor(GgmlType.I8, (12 << 20,))
        assert await c.set_tensor_hash(t, digest, offset=64) is False  # miss
        await c.set_tensor(t, data, offset=64, cache=True)
        await c.ping()
    async with await connect(any_server) as c:  # a new connection: new buffers, same cache
        buf = await c.alloc_buffer(12 << 20)
        t = buf.tensor(GgmlType.I8, (12 << 20,))
        assert await c.set_tensor_hash(t, digest, offset=64) is True  # hit
        assert await c.get_tensor(t, 64, data.nbytes) == data.tobytes()
        assert await c.set_tensor_hash(t, digest ^ 0xFF) is False


async def test_unflagged_upload_is_not_cached(any_server):
    data = np.full(11 << 20, 9, dtype=np.uint8)
    async with await connect(any_server) as c:
        buf = await c.alloc_buffer(11 << 20)
        t = buf.tensor(GgmlType.I8, (11 << 20,))
        await c.set_tensor(t, data)  # cache_flag 0
        assert await c.set_tensor_hash(t, fnv1a_64(data)) is False
