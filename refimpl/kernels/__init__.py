"""CPU kernels, one op family per module: each pairs numba kernels (what the server runs)
with a plain-numpy ``reference`` (what the tests compare against) and registers a binder per
op with :func:`refimpl.graph.registry.kernel`.  The engine imports this package when it first
binds a graph for a CPU device (:func:`refimpl.graph.registry.load_kernels`); CUDA's kernels
are the subpackage :mod:`refimpl.kernels.cuda`, imported only for CUDA devices.
"""

from . import cache

cache.install()     # before any kernel is defined: numba must see edits of shared helpers

from . import (binary, conv, copy, elementwise, flash_attn, get_rows, layout, matmul,  # noqa: E402, F401
               norm, recurrent, reduce, rope, set_rows, softmax, sort, training, unary, warmup)

warmup.dispatchers()   # listed now, before anything freezes the collector's objects
