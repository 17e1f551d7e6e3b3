"""The graph engine: rebuild GRAPH_COMPUTE graphs, validate every node, run kernels."""

from .build import Graph, GraphInvalid, GraphLimits, Node, build_graph
from .engine import GraphExecutor, compile_graph
from .ops import Op, UnaryOp, GluOp


def make_executor(devices):
    """Executor factory for ServerConfig.graph_executor_factory (loads every kernel module)."""
    from .. import kernels  # noqa: F401  (registers the op implementations)
    return GraphExecutor(devices)


__all__ = ["Graph", "GraphInvalid", "GraphLimits", "Node", "build_graph", "GraphExecutor",
           "compile_graph", "Op", "UnaryOp", "GluOp", "make_executor"]
