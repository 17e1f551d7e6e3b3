"""tools.cuda_sim: under the simulator, every thread of a block that asks for
the same ``cuda.shared.array`` gets the same array, however the interpreter switches
threads (the simulator's own allocation lets two threads keep private copies; CI saw a block
reduction come out wrong that way)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from .conftest import SIMULATED

pytestmark = pytest.mark.skipif(not SIMULATED, reason="a fix for the simulator only")


def _shared_arrays_seen_by(n_threads: int, monkeypatch) -> list:
    """The shared array each of ``n_threads`` threads of one simulated block gets from one
    call site, with numpy's allocation slowed so that every thread reaches the call before
    the first allocation is stored (the switch that CI hit by chance, forced)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    from tools import cuda_sim
    cuda_sim.install()  # idempotent: conftest.py installed the fix already

    allocate = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(0.02)
        return allocate(*args, **kwargs)

    shared = FakeCUDAShared(0)
    got = [None] * n_threads
    start = threading.Barrier(n_threads)

    def thread(i):
        start.wait()
        got[i] = shared.array(8, np.float32)          # one call site, as in a kernel

    monkeypatch.setattr(np, "empty", slow_empty)
    threads = [threading.Thread(target=thread, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_every_thread_of_a_block_gets_one_shared_array(monkeypatch):
    got = _shared_arrays_seen_by(8, monkeypatch)
    assert all(a is got[0] for a in got)
    assert got[0].shape == (8,) and got[0].dtype == np.float32


def test_different_call_sites_get_different_arrays():
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    from tools import cuda_sim
    cuda_sim.install()

    shared = FakeCUDAShared(64)
    a = shared.array(4, np.float32)
    b = shared.array(4, np.int32)
    assert a is not b and b.dtype == np.int32
    dyn = shared.array(0, np.dtype(np.float32))        # dynamic: left to the simulator
    assert dyn.size == 16
