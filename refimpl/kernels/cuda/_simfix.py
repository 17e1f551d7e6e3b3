"""A fix for a race in numba's CUDA simulator that reducing kernels would otherwise hit.

The simulator runs every CUDA thread of a block as a Python thread.  ``cuda.shared.array``
is meant to hand all of them one array, but the simulator creates it lazily, per call site,
with an unlocked look-up-then-store: when the interpreter switches threads between the two
(more likely on a loaded machine, as in CI), two threads of one block each create and keep
their own "shared" array, and a block reduction (``_common.block_sum``) then adds partial
sums that other threads never see.  The result is silently wrong, and only sometimes.

On a real GPU shared memory has no such problem, so nothing here runs there.  Under the
simulator :func:`install` wraps the allocation in a lock, keeping the simulator's own
behaviour otherwise (one array per call site and block).  We patch rather than restructure
the kernels because the alternative, dynamic shared memory sized at every launch, would
make every reducing kernel's launch harder to read for the sake of a test-only backend.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from numba.core import types
from numba.np import numpy_support

_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Make the simulator's ``cuda.shared.array`` allocation atomic; True if it was patched
    now (False when already patched, or when numba has no simulator class to patch)."""
    global _installed
    if _installed:
        return False
    try:
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
    except ImportError:
        return False
    FakeCUDAShared.array = _locked(FakeCUDAShared.array)
    _installed = True
    return True


def _locked(unlocked):
    """``FakeCUDAShared.array`` with its look-up and store under one lock.  The simulator
    keys each allocation by the file and line of its caller, so a wrapper that merely called
    it would make every call site look like the wrapper's own line (and alias all shared
    arrays): the keyed look-up is done here, by the kernel's file and line, and only dynamic
    shared memory (size 0, one preallocated array per block, race-free) is left to the
    simulator's own method."""

    def array(self, shape, dtype):
        if shape == 0:
            return unlocked(self, shape, dtype)
        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        with _lock:
            res = self._allocations.get(key)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = np.empty(shape, dt)
                self._allocations[key] = res
        return res

    return array
