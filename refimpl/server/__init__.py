"""refimpl-server: a trio ggml RPC server (sans-IO session logic + thin network layer)."""

import os as _os

# The CPU device's kernels use two thread pools on the same cores, taking turns many times a
# graph: numba's (GNU OpenMP) and numpy's BLAS (OpenBLAS, MUL_MAT's batched products).  By
# default an idle OpenBLAS worker spins for about 2^28 cycles and an idle OpenMP one for
# 300000 polls, each holding a core the other pool needs: with two threads, prompt processing
# ran four times slower (bench/README.md).  Both are read when the libraries load, so they are
# set here, before the server's modules import numpy and numba; the environment overrides.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
_os.environ.setdefault("GOMP_SPINCOUNT", "2000")

from ..buffers import Rejected  # noqa: E402
from .net import RpcServer, ServerConfig  # noqa: E402
from .session import Session  # noqa: E402

__all__ = ["RpcServer", "ServerConfig", "Session", "Rejected"]
