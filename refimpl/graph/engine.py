"""GRAPH_COMPUTE and GRAPH_RECOMPUTE: build, validate and bind a whole graph, then run it
(spec/graph.md).

A graph is refused whole or run whole: every node is validated and bound to a kernel before
the first kernel runs.  The last graph run on each device is kept for GRAPH_RECOMPUTE until
the connection frees a buffer or ends.  Kernels of one device run one graph at a time (a
device lock): the CPU has no spare cores to give a second graph, and it keeps numba's thread
pool to one user.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass

from ..buffers import BufferTable
from ..devices import Device
from ..protocol.messages import GraphComputeRequest
from ..protocol.profiles import LATEST, Profile
from ..protocol.tensor import RPC_TENSOR_SIZE
from .build import NODE_COST, Graph, GraphInvalid, GraphLimits, build_graph
from .registry import Runner, bind_node, computed, load_kernels

log = logging.getLogger("refimpl.graph")
cmdlog = logging.getLogger("refimpl.server.commands")

_device_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(device: Device) -> threading.Lock:
    with _locks_guard:
        return _device_locks.setdefault(id(device), threading.Lock())


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector held off while a graph is built and bound: that makes some
    ten objects per tensor, none in a cycle that outlives the graph, and a full collection
    in the middle (over every object of the server) took longer than the build itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_frozen = threading.Event()


def freeze_survivors_once() -> None:
    """Once per process, after its first graph: a full collection, then every object that
    survived it (the server's modules, numba's kernels loaded by that graph: some 150 000)
    moved out of the cycle collector's reach (``gc.freeze``).  Otherwise each full
    collection scans them all: 70 to 85 ms on the development host, about every third
    GRAPH_COMPUTE (each leaves a graph's worth of objects behind until the next), so one
    model load in two paid one.  Only survivors of a collection are frozen, never garbage;
    a frozen object that dies later is freed by its reference count as before (a graph's
    objects hold no cycles: tests/test_graph_collector.py)."""
    if _frozen.is_set():
        return
    with _locks_guard:
        if not _frozen.is_set():
            gc.collect()
            gc.freeze()
            _frozen.set()


@dataclass
class Plan:
    """A bound graph: one runner per node that does work, in execution order."""

    graph: Graph
    steps: list[tuple[object, Runner]]

    def run(self) -> None:
        """Run every step; a runner raising GraphInvalid (bad data at run time) stops it."""
        for node, runner in self.steps:
            runner()


def compile_graph(graph: Graph, device: Device) -> Plan:
    """Validate and bind every node to a kernel of the device's kind (nothing runs here)."""
    kind = getattr(device, "kind", "cpu")
    load_kernels(kind)
    steps = []
    for node in graph.nodes:
        runner = bind_node(node, kind)
        if runner is not None:
            steps.append((node, runner))
    return Plan(graph, steps)


class GraphExecutor:
    """Per-connection graph state: the stored plan of each device."""

    def __init__(self, devices: list[Device], limits: GraphLimits = GraphLimits()):
        self.devices = devices
        self.limits = limits
        self._stored: dict[int, Plan] = {}

    def request_bytes(self, req: GraphComputeRequest) -> int:
        """Memory a GRAPH_COMPUTE holds while it is decoded and run (its payload and the
        rebuilt tensors), for the server's memory budget."""
        return len(req.nodes) * 8 + len(req.tensors) * (RPC_TENSOR_SIZE + NODE_COST)

    def stored_bytes(self) -> int:
        """Memory held by the graphs kept for GRAPH_RECOMPUTE."""
        return sum(len(p.graph.tensors) * NODE_COST for p in self._stored.values())

    def forget(self) -> None:
        """Drop stored graphs (a buffer they may use was freed, or the connection ended)."""
        self._stored.clear()

    def compute(self, req: GraphComputeRequest, buffers: BufferTable,
                profile: Profile = LATEST) -> None:
        """GRAPH_COMPUTE: build (placing tensors in ``buffers``, reading op numbers as
        ``profile`` numbers them), validate, bind, run, store."""
        self._stored.pop(req.device, None)
        t0 = time.perf_counter()
        device = self.devices[req.device]
        with _collector_paused():
            graph = build_graph(req, buffers, self.limits, profile)
            plan = compile_graph(graph, device)
        t1 = time.perf_counter()
        self._run(plan, device)
        if "GRAPH_RECOMPUTE" in profile.commands:  # 3.0.0 has no GRAPH_RECOMPUTE: keep nothing
            self._stored[req.device] = plan
        cmdlog.debug("graph_compute device=%d nodes=%d tensors=%d kernels=%d build=%.1fms "
                     "run=%.1fms", req.device, len(graph.nodes), len(graph.tensors),
                     len(plan.steps), (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        computed(getattr(device, "kind", "cpu"))   # before the freeze: it lists live objects
        freeze_survivors_once()

    def recompute(self, device_index: int) -> None:
        """GRAPH_RECOMPUTE: run the stored plan again."""
        plan = self._stored.get(device_index)
        if plan is None:
            raise GraphInvalid(f"GRAPH_RECOMPUTE on device {device_index} without a stored graph")
        t0 = time.perf_counter()
        self._run(plan, self.devices[device_index])
        cmdlog.debug("graph_recompute device=%d kernels=%d run=%.1fms", device_index,
                     len(plan.steps), (time.perf_counter() - t0) * 1e3)

    def _run(self, plan: Plan, device: Device) -> None:
        with _lock_for(device):
            device.enter_compute_thread()
            try:
                plan.run()
            except GraphInvalid:
                self._stored.pop(plan.graph.device, None)
                raise
