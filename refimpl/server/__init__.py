"""refimpl-server: a trio ggml RPC server (sans-IO session logic + thin network layer)."""

from .. import thread_pools as _thread_pools

# Before the server's modules import numpy and numba (refimpl.thread_pools says why).
_thread_pools.configure()

from ..buffers import Rejected  # noqa: E402
from .net import RpcServer, ServerConfig  # noqa: E402
from .session import Session  # noqa: E402

__all__ = ["RpcServer", "ServerConfig", "Session", "Rejected"]
