"""``refimpl-server -t N``: the kernels of a graph run with N threads (issue 12).

numba's thread count is a per-thread setting and graphs run in trio's worker threads, not in
the thread that parsed the command line, so the CPU device applies it in the thread that runs
its kernels (``Device.enter_compute_thread``)."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from refimpl.client import RpcClient
from refimpl.devices import CpuDevice
from refimpl.graph import engine
from refimpl.kernels.parallel import compute_threads
from refimpl.protocol.ggml_types import GgmlType
from refimpl.protocol.tensor import RpcTensor
from refimpl.server import RpcServer
from refimpl.server.cli import build_parser
from refimpl.server.net import usable_cores

from .conftest import make_config


def _numpy_blas() -> list[dict]:
    """threadpoolctl's records of the BLAS library numpy calls (a wheel carries it in
    numpy.libs; other BLAS libraries in the process, e.g. scipy's, are not MUL_MAT's)."""
    libs = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    wheel = os.path.dirname(os.path.dirname(np.__file__))
    own = [lib for lib in libs if lib["filepath"].startswith(os.path.join(wheel, "numpy"))]
    return own or libs


@pytest.fixture
def threads_seen(monkeypatch) -> list:
    """numba's (as numba and refimpl's sized kernels see it) and the BLAS library's thread counts in the thread that runs each graph's
    kernels."""
    seen = []
    original = engine.Plan.run

    def run(plan):
        blas = {lib["num_threads"] for lib in _numpy_blas()}
        seen.append((numba.get_num_threads(), compute_threads(), blas))
        original(plan)

    monkeypatch.setattr(engine.Plan, "run", run)
    return seen


async def _compute_one_graph(server) -> None:
    async with await RpcClient.connect("127.0.0.1", server.port) as c:
        buf = await c.alloc_buffer(1024)
        a = RpcTensor(id=1, type=GgmlType.F32, buffer=buf.handle, ne=(8, 1, 1, 1),
                      nb=(4, 32, 32, 32), data=buf.base)
        out = RpcTensor(id=2, type=GgmlType.F32, op=2, buffer=buf.handle, ne=(8, 1, 1, 1),
                        nb=(4, 32, 32, 32), data=buf.base + 64, src=(1, 1) + (0,) * 8)
        await c.set_tensor(a, np.arange(8, dtype=np.float32))
        await c.graph_compute(0, [2], [a, out])
        got = np.frombuffer(await c.get_tensor(out, 0, 32), np.float32)
        assert np.array_equal(got, 2 * np.arange(8, dtype=np.float32))   # ADD(a, a)


@pytest.mark.parametrize("threads", sorted({1, numba.config.NUMBA_NUM_THREADS}))
async def test_kernels_run_with_the_device_threads(nursery, threads_seen, threads):
    # the main thread's setting must not be what the worker sees
    other = numba.config.NUMBA_NUM_THREADS if threads == 1 else 1
    numba.set_num_threads(other)
    limiter = threadpool_limits(other, user_api="blas")    # held: it restores when collected
    try:
        cfg = make_config(devices=[CpuDevice(capacity=1 << 20, threads=threads)])
        server = await nursery.start(RpcServer(cfg).serve)
        await _compute_one_graph(server)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        limiter.restore_original_limits()
    assert threads_seen == [(threads, threads, {threads})]


def test_default_threads_are_the_usable_cores():
    assert build_parser().parse_args([]).threads == usable_cores() >= 1
