"""The graph engine: rebuild GRAPH_COMPUTE graphs, validate every node, run kernels."""

from .build import Graph, GraphInvalid, GraphLimits, Node, build_graph
from .engine import GraphExecutor, compile_graph
from .ops import Op, UnaryOp, GluOp
from . import validators  # noqa: F401  (every op's validator, registered on import)


def make_executor(devices):
    """Executor factory for ServerConfig.graph_executor_factory."""
    return GraphExecutor(devices)


__all__ = ["Graph", "GraphInvalid", "GraphLimits", "Node", "build_graph", "GraphExecutor",
           "compile_graph", "Op", "UnaryOp", "GluOp", "make_executor"]
