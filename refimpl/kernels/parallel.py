"""One parallel launch per node, and only when the work pays for it.

numba's parallel kernels (``prange``) start the thread pool on every call.  For the small
tensors of one-token steps (a row of 576 floats) that costs more than the work, and far more
on a busy machine, where a worker thread must first get a core.  :func:`sized_kernel` compiles
a kernel twice, with and without ``parallel``; each call runs the serial one when its work
(the size of one chosen argument: the one that measures the work, e.g. a product's weights,
not its output) is below :data:`SERIAL_BELOW` elements (or the kernel's own threshold), or
when the calling thread has one numba thread (``-t 1``, :func:`compute_threads`): a
one-thread launch still costs its start.  Both compile the same source, so they compute the
same values.

Inside a parallel loop, the one-token products take raw addresses (``array.ctypes.data``
plus strides) rather than slicing arrays per row: a view made there counts references on its
parent with atomic instructions, which all threads would do on the one shared weight array.
(Measured on the 2-core development host, this made no difference that stood out of its
noise; it costs nothing, and the rows are where the work is.)
"""

from __future__ import annotations

import functools
import threading
import types

import numba
import numpy as np
from numba import njit

#: Elements below which a kernel runs in the calling thread.
SERIAL_BELOW = 1 << 14


def renamed_copy(fn, suffix: str, **bound):
    """A copy of ``fn`` named ``fn.__name__ + suffix`` (numba's on-disk cache tells kernels
    apart by name), whose module globals named in ``bound`` are replaced by their values there
    (one kernel body compiled once per format: refimpl.kernels.matmul_fast)."""
    scope = dict(fn.__globals__, **bound) if bound else fn.__globals__
    twin = types.FunctionType(fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__,
                              fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin

_here = threading.local()


def set_compute_threads(n: int) -> None:
    """Give numba's parallel kernels ``n`` threads in the calling thread (``numba``'s own
    setting is per thread too), and remember it here: asking numba costs microseconds a call,
    which a one-token step would pay at every node."""
    numba.set_num_threads(n)
    _here.threads = n


def compute_threads() -> int:
    """The numba thread count of the calling thread (as :func:`set_compute_threads` set it,
    else numba's default, asked once per thread)."""
    n = getattr(_here, "threads", None)
    if n is None:
        n = _here.threads = numba.get_num_threads()
    return n


class SizedKernel:
    """A kernel compiled serial and parallel, picking by the size of argument ``work_arg``."""

    def __init__(self, fn, work_arg: int, options: dict, serial_below: int = SERIAL_BELOW,
                 work=None):
        # IEEE division (x/0 is ±inf or NaN) in both: numba's parallel loops already divide so,
        # its serial default would raise ZeroDivisionError instead
        options = {"error_model": "numpy", **options}
        self.parallel = njit(parallel=True, **options)(fn)
        # a distinct function object (and name) so that numba's on-disk cache keeps both
        self.serial = njit(**options)(renamed_copy(fn, "_serial"))
        self.work_arg = work_arg
        self.serial_below = serial_below
        self.work = work
        functools.update_wrapper(self, fn)

    def pick(self, *args):
        """The compiled twin a call with these arguments runs."""
        if compute_threads() == 1:
            return self.serial
        size = self.work(*args) if self.work is not None else np.size(args[self.work_arg])
        serial = size < self.serial_below
        return self.serial if serial else self.parallel

    def __call__(self, *args):
        return self.pick(*args)(*args)


def sized_kernel(work_arg: int, serial_below: int = SERIAL_BELOW, work=None, **options):
    """Decorator: ``@sized_kernel(work_arg=2, cache=True, nogil=True)`` in place of
    ``@njit(parallel=True, cache=True, nogil=True)`` for a kernel called from Python.
    ``work``, if given, measures the work from all the arguments instead (a function of
    them, returning a size to compare with ``serial_below``)."""
    return lambda fn: SizedKernel(fn, work_arg, options, serial_below, work)
