"""Which ops the server knows, and which device computes them (spec/graph-ops.md).

Two tables, filled the same way for every op and device:

* **validators** (:func:`validates`): what ggml accepts: the types, shapes, strides and op
  parameters the ggml constructor of the op would accept and a kernel needs.  They are
  device-independent and live graph side, in :mod:`refimpl.graph.validators`, loaded with
  :mod:`refimpl.graph` itself;
* **kernels** (:func:`kernel`): how one kind of device computes a validated node: a function
  that binds it to a runner, or returns None when that device has no kernel for the node's
  types or parameters.  The CPU's live in :mod:`refimpl.kernels`, CUDA's in
  :mod:`refimpl.kernels.cuda`; :func:`load_kernels` imports a device kind's package when the
  engine first binds a graph for such a device.

Binding happens for every node before any kernel runs, so a graph with anything unsupported
is refused whole, never computed half.  A new op is one validator, one kernel per device and
one test.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .build import GraphInvalid, Node
from .ops import VIEW_OPS, op_name

#: A bound kernel: runs one node on data already in place.
Runner = Callable[[], None]
#: A validator: raises GraphInvalid unless the node is an instance of its op ggml accepts.
Validator = Callable[[Node], None]
#: A kernel binder: a runner for a validated node, or None (no kernel for these types).
Binder = Callable[[Node], "Runner | None"]

_VALIDATORS: dict[int, Validator] = {}
_KERNELS: dict[tuple[int, str], Binder] = {}

#: The package holding each device kind's kernels.
KERNEL_PACKAGES = {"cpu": "refimpl.kernels", "cuda": "refimpl.kernels.cuda"}


def validates(*ops):
    """Decorator: ``fn(node)`` validates nodes of ``ops`` (for every device)."""
    def deco(fn: Validator) -> Validator:
        for op in ops:
            if int(op) in _VALIDATORS:
                raise RuntimeError(f"op {op_name(op)} has two validators")
            _VALIDATORS[int(op)] = fn
        return fn
    return deco


def kernel(device_kind: str, *ops):
    """Decorator: ``fn(node) -> Runner | None`` binds validated nodes of ``ops`` on devices
    of kind ``device_kind``."""
    def deco(fn: Binder) -> Binder:
        for op in ops:
            key = (int(op), device_kind)
            if key in _KERNELS:
                raise RuntimeError(f"{device_kind} kernel for {op_name(op)} registered twice")
            _KERNELS[key] = fn
        return fn
    return deco


#: Per device kind, what its kernels package does after each GRAPH_COMPUTE
#: (:func:`after_compute`; the CPU's records the kernels compiled, refimpl.kernels.warmup).
_AFTER_COMPUTE: dict[str, Callable[[], object]] = {}


def after_compute(device_kind: str):
    """Decorator: ``fn()`` runs after every GRAPH_COMPUTE on devices of ``device_kind``."""
    def deco(fn):
        _AFTER_COMPUTE[device_kind] = fn
        return fn
    return deco


def computed(device_kind: str) -> None:
    """Called by the engine after a GRAPH_COMPUTE has run on a device of ``device_kind``."""
    hook = _AFTER_COMPUTE.get(device_kind)
    if hook is not None:
        hook()


def load_kernels(device_kind: str) -> None:
    """Import the kernels of ``device_kind`` (once; later calls cost a dict lookup)."""
    package = KERNEL_PACKAGES.get(device_kind)
    if package is None:
        raise GraphInvalid(f"no kernels for devices of kind {device_kind!r}")
    importlib.import_module(package)


def validated_ops() -> frozenset[int]:
    """The ops this server knows (has a validator for)."""
    return frozenset(_VALIDATORS)


def bind_node(node: Node, device_kind: str) -> Runner | None:
    """Validate ``node`` and bind it to a kernel of ``device_kind`` (whose kernels must be
    loaded); returns None for the view ops, which need no work."""
    validator = _VALIDATORS.get(node.op)
    if validator is None:
        raise GraphInvalid(f"node {node.describe()}: op {op_name(node.op)} is not implemented "
                           f"by this server")
    validator(node)
    if node.op in VIEW_OPS:
        return None
    for i, s in enumerate(node.src):   # what a kernel reads lies in this server's memory
        if s is not None and s.buffer is None:
            raise GraphInvalid(f"node {node.describe()}: src[{i}] '{s.name}' has no buffer on "
                               f"this server")
    binder = _KERNELS.get((node.op, device_kind))
    runner = binder(node) if binder is not None else None
    if runner is None:
        what = ("this type combination" if binder is not None
                else f"op {op_name(node.op)}")
        raise GraphInvalid(f"node {node.describe()}: no {device_kind} kernel for {what} "
                           f"({describe_types(node)})")
    return runner


def describe_types(node: Node) -> str:
    """``dst=f32 src0=q4_0 src1=f32`` for messages."""
    parts = [f"dst={node.traits.name}"]
    for i, s in enumerate(node.src):
        if s is not None:
            parts.append(f"src{i}={s.traits.name}")
    return " ".join(parts)
