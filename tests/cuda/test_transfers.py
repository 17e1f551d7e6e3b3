"""Transfers into GPU buffers (refimpl/devices/cuda.py, docs/cuda.md): pinned staging whose
landed chunks are copied to the device while the rest of a SET_TENSOR payload is still
arriving, pageable staging copied once at the end, and a staging pool that keeps pinned
memory only."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.client import RpcClient
from refimpl.devices import cuda as cuda_dev
from refimpl.protocol import GgmlType as T
from refimpl.server.net import RpcServer

from ..conftest import make_config


@pytest.fixture
def gpu():
    """A CUDA device of its own, so that its staging pool starts empty."""
    from refimpl.devices import open_device
    return open_device("cuda0", capacity=64 << 20)


def _on_device(buf, n: int) -> bytes:
    """The first ``n`` bytes of a buffer as the GPU holds them (not through staging)."""
    return bytes(buf.dev.copy_to_host()[:n])


def test_landed_chunks_reach_the_device_before_the_region_closes(gpu, monkeypatch):
    monkeypatch.setattr(cuda_dev, "UPLOAD_CHUNK", 64)
    buf = gpu.allocate(1024)
    data = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    with buf.write_region(0, 512) as region:
        region.view[:200] = data[:200]
        region.landed(200)                      # three whole chunks have landed
        assert _on_device(buf, 512) == data[:192] + bytes(320)
        region.view[200:] = data[200:]
        region.landed(512)
        assert _on_device(buf, 512) == data     # every chunk is whole now
    assert _on_device(buf, 1024) == data + bytes(512)
    buf.release()


def test_the_remainder_is_copied_when_the_region_closes(gpu, monkeypatch):
    monkeypatch.setattr(cuda_dev, "UPLOAD_CHUNK", 64)
    buf = gpu.allocate(256)
    with buf.write_region(16, 100) as region:
        region.view[:] = b"\x05" * 100
        region.landed(100)                      # one chunk sent, 36 bytes still staged
        assert _on_device(buf, 256)[16:116] == b"\x05" * 64 + bytes(36)
    assert _on_device(buf, 256) == bytes(16) + b"\x05" * 100 + bytes(140)
    buf.release()


def test_a_failed_write_stops_copying_and_gives_its_staging_back(gpu, monkeypatch):
    monkeypatch.setattr(cuda_dev, "UPLOAD_CHUNK", 64)
    buf = gpu.allocate(512)
    with pytest.raises(ConnectionError):
        with buf.write_region(0, 512) as region:
            region.view[:] = b"\x07" * 512
            region.landed(130)
            raise ConnectionError("peer went away mid-payload")
    # what had landed is on the device, nothing after it: as on the CPU, where the socket's
    # bytes land in the buffer itself
    assert _on_device(buf, 512) == b"\x07" * 128 + bytes(384)
    assert len(gpu.staging._free) == 1      # its staging is back in the pool
    buf.release()


def test_pageable_staging_is_copied_once_at_the_end(gpu, monkeypatch):
    monkeypatch.setattr(cuda_dev, "UPLOAD_CHUNK", 64)
    monkeypatch.setattr(cuda_dev, "STAGING_MAX", 256)   # larger regions: pageable memory
    buf = gpu.allocate(1024)
    with buf.write_region(0, 1024) as region:
        region.view[:] = b"\x09" * 1024
        region.landed(1024)
        assert _on_device(buf, 1024) == bytes(1024)   # no early copy from pageable memory
    assert _on_device(buf, 1024) == b"\x09" * 1024
    assert not gpu.staging._free                      # and nothing pageable is pooled
    buf.release()


def test_the_staging_pool_keeps_pinned_memory_only(gpu, monkeypatch):
    monkeypatch.setattr(cuda_dev, "STAGING_MAX", 256)
    pool = gpu.staging
    big, pinned = pool.take(4 << 20)
    assert not pinned
    pool.give(big)
    assert not any(a is big for a in pool._free)
    small, pinned = pool.take(100)
    assert pinned
    pool.give(small)
    assert any(a is small for a in pool._free)


async def test_set_tensor_tells_the_gpu_buffer_as_bytes_land(gpu, monkeypatch, nursery):
    """Through the server: SET_TENSOR's payload is reported to the region as it arrives, so
    copies start before the last byte, and the tensor reads back whole."""
    monkeypatch.setattr(cuda_dev, "UPLOAD_CHUNK", 64 << 10)
    reports: list[int] = []
    landed = cuda_dev._Upload.landed

    def spy(self, count):
        reports.append(count)
        landed(self, count)
    monkeypatch.setattr(cuda_dev._Upload, "landed", spy)
    server = await nursery.start(RpcServer(make_config(devices=[gpu])).serve)
    data = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8)
    async with await RpcClient.connect("127.0.0.1", server.port) as c:
        buf = await c.alloc_buffer(data.size)
        t = buf.tensor(T.I8, (data.size,))
        await c.set_tensor(t, data.tobytes())
        assert bytes(await c.get_tensor(t, 0, data.size)) == data.tobytes()
        await c.free_buffer(buf.handle)
    assert reports == sorted(reports) and reports[-1] == data.size
    assert len(reports) > 1 and reports[0] < data.size
