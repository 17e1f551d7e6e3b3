"""The buffers one connection holds: handles, addresses and placements (spec/handles.md).

Shared by the server's sessions and the graph engine (which places graph tensors in the same
table), so neither imports the other.

Handles and base addresses are opaque values chosen here, never reused while the server runs,
so a stale handle or address from a freed buffer can never reach a newer buffer, and one
connection's values mean nothing on another.  Addresses are not host pointers: a client
cannot aim them at server memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .devices import Device, DeviceBuffer
from .protocol.tensor import RpcTensor, tensor_nbytes_of, tensor_problem

#: First base address handed out, and the granularity and gap between buffers' ranges.
ADDRESS_START = 0x1_0000_0000
ADDRESS_GRANULE = 1 << 20
ADDRESS_GAP = 1 << 20
#: First handle value.
HANDLE_START = 0x100

__all__ = ["Rejected", "AllocatedBuffer", "Placement", "AddressSpace", "BufferTable"]


class Rejected(Exception):
    """A request the server refuses: the connection is closed after logging the reason."""


@dataclass
class AllocatedBuffer:
    """A buffer one client allocated, as the server holds it: handle, base address, device
    and memory.  (The client's view of the same buffer is :class:`refimpl.client.RemoteBuffer`.)"""

    handle: int
    base: int
    device_index: int
    memory: DeviceBuffer

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.memory.size

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.memory.size


@dataclass(frozen=True)
class Placement:
    """Where a wire tensor's bytes live: ``nbytes`` bytes at ``offset`` inside ``buffer``."""

    buffer: AllocatedBuffer
    offset: int
    nbytes: int


class AddressSpace:
    """Where handles and base addresses come from, shared by all connections of a server.

    Sharing it means a handle or address of one connection is never valid in another, and
    values are never reused while the server runs.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._next_handle = HANDLE_START
        self._next_address = ADDRESS_START

    def assign(self, size: int, alignment: int) -> tuple[int, int]:
        """A fresh ``(handle, base)`` for a buffer of ``size`` bytes."""
        alignment = max(alignment, ADDRESS_GRANULE)
        with self._lock:
            base = -(-self._next_address // alignment) * alignment
            self._next_address = base + size + ADDRESS_GAP
            handle = self._next_handle
            self._next_handle += 1
        return handle, base


class BufferTable:
    """Handles -> buffers for one connection, and tensor placement checks."""

    def __init__(self, devices: list[Device], space: AddressSpace | None = None):
        self.devices = devices
        self.space = space or AddressSpace()
        self._by_handle: dict[int, AllocatedBuffer] = {}

    def __len__(self):
        return len(self._by_handle)

    def __iter__(self):
        return iter(list(self._by_handle.values()))

    def add(self, device_index: int, memory: DeviceBuffer) -> AllocatedBuffer:
        """Register a freshly allocated buffer; returns it with its new handle and base."""
        handle, base = self.space.assign(memory.size, self.devices[device_index].alignment)
        buf = AllocatedBuffer(handle, base, device_index, memory)
        self._by_handle[buf.handle] = buf
        return buf

    def get(self, handle: int) -> AllocatedBuffer:
        """The live buffer with this handle; Rejected if there is none."""
        buf = self._by_handle.get(handle)
        if buf is None:
            raise Rejected(f"buffer handle 0x{handle:x} is not a live buffer of this connection")
        return buf

    def remove(self, handle: int) -> None:
        """Forget and free a buffer."""
        self.get(handle)
        self._by_handle.pop(handle).memory.release()

    def release_all(self) -> None:
        """Free every buffer (the connection is ending)."""
        for buf in self._by_handle.values():
            buf.memory.release()
        self._by_handle.clear()

    def check_tensor(self, t: RpcTensor, what: str = "tensor") -> None:
        """Stateless validity plus: a non-zero buffer handle must be live (spec/tensor.md)."""
        problem = tensor_problem(t)
        if problem:
            raise Rejected(f"{what}: {problem}")
        if t.buffer:
            self.place(t, what)

    def place(self, t: RpcTensor, what: str = "tensor") -> Placement:
        """Locate a tensor's bytes: valid type, live buffer, all bytes inside the buffer."""
        problem = tensor_problem(t)
        if problem:
            raise Rejected(f"{what}: {problem}")
        if t.buffer == 0:
            raise Rejected(f"{what} '{t.label}' has no buffer")
        buf = self.get(t.buffer)
        nbytes = tensor_nbytes_of(t)
        if t.data < buf.base or t.data + nbytes > buf.end:
            raise Rejected(
                f"{what} '{t.label}' spans [0x{t.data:x}, 0x{t.data + nbytes:x}) outside its "
                f"buffer [0x{buf.base:x}, 0x{buf.end:x})")
        return Placement(buf, t.data - buf.base, nbytes)

    def place_region(self, t: RpcTensor, offset: int, size: int, what: str) -> Placement:
        """Locate ``size`` bytes at byte ``offset`` of a tensor; the region must lie inside it."""
        p = self.place(t, what)
        if offset > p.nbytes or size > p.nbytes - offset:
            raise Rejected(
                f"{what} region [{offset}, {offset + size}) is outside tensor '{t.label}' "
                f"of {p.nbytes} bytes")
        return Placement(p.buffer, p.offset + offset, size)
