"""The cycle collector and GRAPH_COMPUTE (refimpl.graph.engine.freeze_survivors_once): after
the first graph the process's survivors are frozen, and a graph's objects hold no cycles,
so nothing of a graph is ever left to the collector (frozen or not, it is freed by its
reference counts)."""

from __future__ import annotations

import gc

import numpy as np

from refimpl.graph import GraphExecutor, Op
from refimpl.kernels import quants as Q
from refimpl.protocol.ggml_types import GgmlType as T
from tools.graphs import GraphBuilder

from .kernels.test_quants import random_rows


def _small_layer() -> GraphBuilder:
    """A few nodes of a llama layer: RMS_NORM, MUL, MUL_MAT (Q4_K weights), ADD, SOFT_MAX."""
    rng = np.random.default_rng(0)
    g = GraphBuilder(8 << 20)
    k, n, nt = 256, 32, 4
    x = g.input(T.F32, (k, nt), rng.standard_normal((nt, k)))
    norm_w = g.input(T.F32, (k,), rng.standard_normal(k))
    w = g.input(T.Q4_K, (k, n), random_rows(rng, Q.Q4_K, n, k))
    h = g.node(Op.RMS_NORM, T.F32, (k, nt), [x], [1e-6])
    h = g.node(Op.MUL, T.F32, (k, nt), [h, norm_w])
    y = g.node(Op.MUL_MAT, T.F32, (n, nt), [w, h])
    y = g.node(Op.ADD, T.F32, (n, nt), [y, y])
    g.node(Op.SOFT_MAX, T.F32, (n, nt), [y], [1.0, 0.0])
    return g


def test_graphs_leave_nothing_to_the_collector():
    g = _small_layer()
    ex = GraphExecutor([g.device])
    ex.compute(g.request(), g.table)            # kernels loaded, survivors frozen
    assert gc.get_freeze_count() > 0
    gc.collect()
    saved = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)              # what a collection finds is kept for us
    try:
        for _ in range(3):
            ex.compute(g.request(), g.table)    # each replaces the stored graph
        ex.recompute(0)
        ex.forget()
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("refimpl")]
    finally:
        gc.set_debug(saved)
        gc.garbage.clear()
    assert ours == [], f"{len(ours)} graph objects in cycles, e.g. {ours[:3]}"
