"""The CUDA tests run on numba's CUDA simulator wherever there is no CUDA driver.

NUMBA_ENABLE_CUDASIM must be in effect when numba.cuda is first imported, which nothing in
refimpl does before a CUDA device opens.  This file runs when pytest collects tests/cuda, so
it switches the simulator on here, for this process only: the variable is removed again
afterwards (numba.cuda stays the simulator), so server processes that other tests start do
not inherit it.  Under the simulator it then calls the one hook that prepares a process for
it (:func:`tools.cuda_sim.install`; refimpl itself runs no simulator code).  Servers that the
CUDA tests start get the variable explicitly (``SIM_ENV``) and run the hook too
(``SERVER_MODULE``).

On a machine with a CUDA driver the tests run on the real GPU instead, unless
REFIMPL_CUDA_TESTS=sim asks for the simulator.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest


def _driver_present() -> bool:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _select_backend() -> bool:
    """Import numba.cuda, as the simulator unless a GPU should be used; True if simulated."""
    if "numba.cuda" not in sys.modules:
        want_sim = (os.environ.get("REFIMPL_CUDA_TESTS") == "sim"
                    or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not _driver_present())
        if want_sim:
            had = os.environ.get("NUMBA_ENABLE_CUDASIM")
            os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
            try:
                from numba.core import config
                config.reload_config()
                from numba import cuda  # noqa: F401  (now the simulator, for good)
            finally:
                if had is None:
                    del os.environ["NUMBA_ENABLE_CUDASIM"]
                else:
                    os.environ["NUMBA_ENABLE_CUDASIM"] = had
    from refimpl.devices.cuda import simulated
    if simulated():
        from tools import cuda_sim
        cuda_sim.install()
        return True
    return False


SIMULATED = _select_backend()
#: Environment for server processes the CUDA tests start.
SIM_ENV = {"NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])} \
    if SIMULATED else {}
#: The module those servers run as: refimpl-server, after the simulator hook where simulated.
SERVER_MODULE = "tools.cuda_sim" if SIMULATED else "refimpl.server"


@pytest.fixture(scope="session")
def cuda_device():
    """One CUDA device (GPU 0, or the simulator) for the whole session."""
    from refimpl.devices import open_device
    return open_device("cuda0", capacity=512 << 20)


#: Kernel signatures launched under the simulator: {(module, name): {argument types}}, for
#: test_ptx.py, which compiles each for a real GPU (numba's NVVM, no driver needed).
LAUNCHED: dict = {}


def _type_of(arg) -> str:
    import numpy as np
    if hasattr(arg, "_ary"):        # the simulator's device arrays
        arg = arg._ary
    if isinstance(arg, np.ndarray):
        layout = "::1" if arg.flags.c_contiguous else ":"
        return f"{arg.dtype.name}[{', '.join([':'] * (arg.ndim - 1) + [layout])}]"
    if isinstance(arg, (bool, np.bool_)):
        return "boolean"
    if isinstance(arg, (int, np.integer)):
        return "int64" if isinstance(arg, int) else np.dtype(type(arg)).name
    if isinstance(arg, np.floating):
        return np.dtype(type(arg)).name
    if isinstance(arg, float):
        return "float64"
    raise TypeError(f"unexpected kernel argument {arg!r}")


if SIMULATED:
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    _call = FakeCUDAKernel.__call__

    def _recording_call(self, *args):
        if not self._device:
            key = (self.fn.__module__, self.fn.__name__)
            LAUNCHED.setdefault(key, set()).add(tuple(_type_of(a) for a in args))
        return _call(self, *args)

    FakeCUDAKernel.__call__ = _recording_call
