"""The op registry (refimpl/graph/registry.py): validators load with refimpl.graph and are
shared by every device; kernels are registered per device kind and loaded explicitly by the
engine; a node without a kernel on its device refuses the graph, naming the op."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from refimpl.graph import GraphInvalid, Op, build_graph
from refimpl.graph.ops import VIEW_OPS
from refimpl.graph.registry import _KERNELS, bind_node, load_kernels, validated_ops
from refimpl.protocol import GgmlType as T
from tools.graphs import GraphBuilder


def test_importing_the_graph_package_registers_every_validator_and_no_kernel():
    code = ("import sys, refimpl.graph\n"
            "from refimpl.graph.registry import validated_ops, _KERNELS\n"
            "from refimpl.graph import Op\n"
            "assert Op.ADD in validated_ops() and Op.FLASH_ATTN_EXT in validated_ops()\n"
            "assert not _KERNELS, _KERNELS\n"
            "assert 'refimpl.kernels' not in sys.modules and 'numba' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_validated_op_has_a_cpu_kernel():
    load_kernels("cpu")
    missing = [Op(op).name for op in validated_ops()
               if op not in VIEW_OPS and (op, "cpu") not in _KERNELS]
    assert not missing
    assert not any(op in VIEW_OPS for op, kind in _KERNELS)


def _add_node():
    g = GraphBuilder(1 << 16)
    a = g.input(T.F32, (4,), np.ones(4))
    out = g.node(Op.ADD, T.F32, (4,), [a, a])
    return g, out


def test_a_device_kind_without_the_kernel_refuses_naming_the_op():
    g, out = _add_node()
    node = next(n for n in build_graph(g.request(), g.table).nodes if n.op == Op.ADD)
    with pytest.raises(GraphInvalid, match="no abacus kernel for op ADD"):
        bind_node(node, "abacus")
    with pytest.raises(GraphInvalid, match="no kernels for devices of kind 'abacus'"):
        load_kernels("abacus")


def test_validation_runs_before_any_kernel_is_looked_up():
    g = GraphBuilder(1 << 16)
    a = g.input(T.F32, (4,), np.ones(4))
    b = g.input(T.F32, (3,), np.ones(3))
    g.node(Op.ADD, T.F32, (4,), [a, b])          # src1 does not tile src0
    node = next(n for n in build_graph(g.request(), g.table).nodes if n.op == Op.ADD)
    with pytest.raises(GraphInvalid, match="does not tile"):
        bind_node(node, "abacus")
