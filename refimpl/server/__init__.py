"""refimpl-server: a trio ggml RPC server (sans-IO session logic + thin network layer)."""

from .buffers import Rejected
from .net import RpcServer, ServerConfig
from .session import Session

__all__ = ["RpcServer", "ServerConfig", "Session", "Rejected"]
