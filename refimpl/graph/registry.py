"""Which ops the server can run, on which device, with which types (spec/graph-ops.md).

An op implementation validates a node (device-independent: types, shapes, strides, op
parameters, exactly what the ggml constructor of that op would accept and the kernel needs)
and binds it to a kernel of one device.  Binding happens for every node before any kernel
runs, so a graph with anything unsupported is refused whole, never computed half.
"""

from __future__ import annotations

from typing import Callable

from .build import GraphInvalid, Node
from .ops import op_name

#: A bound kernel: runs one node on data already in place.
Runner = Callable[[], None]


class OpImpl:
    """Base class of op implementations; subclasses set ``ops`` and override the hooks."""

    #: The op numbers this implementation handles.
    ops: tuple = ()

    def check(self, node: Node) -> None:
        """Raise GraphInvalid unless the node is a valid instance of the op (any device)."""

    def bind(self, node: Node, device_kind: str) -> Runner | None:
        """A runner for ``node`` on a device of kind ``device_kind``; None when this device
        has no kernel for the node's types or parameters."""
        raise NotImplementedError


_REGISTRY: dict[int, OpImpl] = {}

#: Kernels of devices other than the CPU, by (op, device kind): each takes an already
#: validated node and returns a runner, or None when that device has no kernel for the node's
#: types or parameters.  Validation stays with the op's OpImpl, so it is shared by every device.
_DEVICE_KERNELS: dict[tuple[int, str], Callable[[Node], "Runner | None"]] = {}


def register(impl_cls):
    """Class decorator: register an OpImpl subclass for each op in its ``ops``."""
    impl = impl_cls()
    for op in impl.ops:
        if op in _REGISTRY:
            raise RuntimeError(f"op {op_name(op)} registered twice")
        _REGISTRY[op] = impl
    return impl_cls


def register_kernel(device_kind: str, *ops):
    """Decorator: ``fn(node) -> Runner | None`` binds validated nodes of ``ops`` on devices of
    kind ``device_kind`` (the CPU's kernels are bound by the OpImpl itself)."""
    def deco(fn):
        for op in ops:
            key = (int(op), device_kind)
            if key in _DEVICE_KERNELS:
                raise RuntimeError(f"{device_kind} kernel for {op_name(op)} registered twice")
            _DEVICE_KERNELS[key] = fn
        return fn
    return deco


def bind_node(node: Node, device_kind: str) -> Runner | None:
    """Validate ``node`` and bind it; returns None for nodes that need no work (views)."""
    impl = _REGISTRY.get(node.op)
    if impl is None:
        raise GraphInvalid(f"node {node.describe()}: op {op_name(node.op)} is not implemented "
                           f"by this server")
    impl.check(node)
    kernel = _DEVICE_KERNELS.get((node.op, device_kind))
    runner = kernel(node) if kernel is not None else impl.bind(node, device_kind)
    if runner is None and not getattr(impl, "no_work", False):
        raise GraphInvalid(f"node {node.describe()}: no {device_kind} kernel for this type "
                           f"combination ({describe_types(node)})")
    return runner


def describe_types(node: Node) -> str:
    """``dst=f32 src0=q4_0 src1=f32`` for messages."""
    parts = [f"dst={node.traits.name}"]
    for i, s in enumerate(node.src):
        if s is not None:
            parts.append(f"src{i}={s.traits.name}")
    return " ".join(parts)
