"""The test configuration's hook for numba's CUDA simulator: :func:`install`.

Nothing in ``refimpl`` runs simulator code: tests/cuda/conftest.py calls :func:`install`
once it has switched numba to the simulator, and a server process the CUDA tests start under
the simulator runs as ``python -m tools.cuda_sim ARGS`` (the hook, then ``refimpl-server
ARGS``).  On a real GPU none of this is called.  The hook does two things:

* it shortens Python's thread switch interval: the simulator runs each CUDA thread as a
  Python thread and every barrier hands the GIL around; at Python's default 5 ms switch
  interval a ``__syncthreads`` costs milliseconds;
* it fixes a race in the simulator that reducing kernels would otherwise hit (below).

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

#: Python's thread switch interval under the simulator, in seconds.
SIM_SWITCH_INTERVAL = 5e-5

_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Prepare this process for the simulator: a short thread switch interval, and the
    simulator's ``cuda.shared.array`` allocation made atomic.  True if it was patched now
    (False when already patched, or when numba has no simulator class to patch)."""
    global _installed
    if _installed:
        return False
    sys.setswitchinterval(min(sys.getswitchinterval(), SIM_SWITCH_INTERVAL))
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

    import numpy as np  # here, not at the top: main() lets refimpl.server load them first
    from numba.core import types
    from numba.np import numpy_support

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


def main(argv=None) -> None:
    """``python -m tools.cuda_sim ARGS``: refimpl-server ARGS in a process prepared for the
    simulator (NUMBA_ENABLE_CUDASIM=1 must be in its environment)."""
    from refimpl.server.cli import main as server_main  # sets the thread pools' environment
    install()
    sys.exit(server_main(argv))


if __name__ == "__main__":
    main()
