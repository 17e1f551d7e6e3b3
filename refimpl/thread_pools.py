"""How long idle worker threads of numba's and numpy's thread pools may spin.

The CPU device's kernels use two thread pools on the same cores, taking turns many times a
graph: numba's (GNU OpenMP) and numpy's BLAS (OpenBLAS, MUL_MAT's batched products).  By
default an idle OpenBLAS worker spins for about 2^28 cycles and an idle OpenMP one for
300000 polls, each holding a core the other pool needs: with two threads, prompt processing
ran four times slower (bench/README.md).  Both settings are read when the libraries load, so
:func:`configure` must run before numpy and numba are imported: ``refimpl.server`` calls it
first thing, and so do the benchmarks that run the kernels in process.  This module imports
nothing else for that reason.
"""

import os

#: The environment defaults :func:`configure` sets (the environment overrides them).
SPIN_LIMITS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "2000"}


def configure() -> None:
    """Set :data:`SPIN_LIMITS` in the environment where not already set."""
    for name, value in SPIN_LIMITS.items():
        os.environ.setdefault(name, value)
