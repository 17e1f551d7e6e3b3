"""What every device provides to the server (spec/commands.md, device commands).

A :class:`Device` owns memory: it hands out :class:`DeviceBuffer` objects, reports its
memory, alignment and size limits, and answers GET_ALLOC_SIZE.  Buffers are device-neutral
from the server's point of view: the server only moves bytes in and out of them through the
methods below, so a device whose memory the host cannot address directly (CUDA) can stage
the bytes without the server knowing.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod


class DeviceUnavailable(Exception):
    """A device named on the command line cannot be opened on this machine."""


class MemoryPool:
    """Byte accounting for one device: every buffer reserves its size here first.

    Thread-safe, since buffers may be freed from worker threads.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.reserved = 0
        self._lock = threading.Lock()

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes if they fit under the capacity."""
        with self._lock:
            if size > self.capacity - self.reserved:
                return False
            self.reserved += size
            return True

    def release(self, size: int) -> None:
        """Give back bytes reserved earlier."""
        with self._lock:
            self.reserved -= size

    @property
    def available(self) -> int:
        """Capacity not reserved."""
        return self.capacity - self.reserved


class WriteRegion:
    """What :meth:`DeviceBuffer.write_region` yields: ``view``, the host memory to fill, and
    :meth:`landed`, by which the writer says how much of it is already final."""

    def __init__(self, view: memoryview):
        self.view = view

    def landed(self, count: int) -> None:
        """The first ``count`` bytes of ``view`` hold their final values (the network layer
        says so as a payload arrives, with counts that only grow).  A device whose memory
        the host cannot address may start moving them; by default nothing happens."""


class DeviceBuffer(ABC):
    """A contiguous block of device memory of ``size`` bytes."""

    def __init__(self, device: "Device", size: int):
        self.device = device
        self.size = size
        self._released = False

    @abstractmethod
    def write_region(self, offset: int, size: int) -> contextlib.AbstractContextManager:
        """Context manager yielding a :class:`WriteRegion` whose ``view`` (writable host
        memory of ``size`` bytes) is to be filled.

        Whatever is written into the view is in the buffer at ``offset`` when the context
        exits normally.  When it exits with an exception, any part of the region may or may
        not have been written.  The caller has already checked the region's bounds.
        """

    @abstractmethod
    def read_region(self, offset: int, size: int) -> memoryview:
        """A host memoryview holding the ``size`` bytes at ``offset`` (valid until the next
        write to the buffer)."""

    @abstractmethod
    def fill(self, offset: int, size: int, value: int) -> None:
        """Set ``size`` bytes at ``offset`` to ``value``."""

    @abstractmethod
    def copy_from(self, src: "DeviceBuffer", src_offset: int, dst_offset: int, size: int) -> bool:
        """Copy bytes from another buffer (or this one; overlapping regions are allowed).

        Returns False when this device cannot read ``src``'s memory.
        """

    def release(self) -> None:
        """Free the memory; idempotent."""
        if not self._released:
            self._released = True
            self._free()
            self.device.pool.release(self.size)

    @abstractmethod
    def _free(self) -> None:
        """Device-specific release of the memory."""


class Device(ABC):
    """A compute device exposed to clients under an index (spec/commands.md, "Devices")."""

    #: Short name shown in the banner, e.g. "CPU" or "CUDA0".
    name: str
    #: Human-readable description, e.g. the processor's model name.
    description: str
    #: Alignment reported by GET_ALIGNMENT; every buffer base is a multiple of it.
    alignment: int

    def __init__(self, capacity: int):
        self.pool = MemoryPool(capacity)

    @abstractmethod
    def memory(self) -> tuple[int, int]:
        """``(free, total)`` bytes, as GET_DEVICE_MEMORY reports them."""

    def max_buffer_size(self) -> int:
        """GET_MAX_SIZE: the largest single buffer; by default the whole capacity."""
        return self.pool.capacity

    def allocate(self, size: int) -> DeviceBuffer | None:
        """A new zero-filled buffer, or None when the memory is not there (ALLOC_BUFFER)."""
        if size > self.max_buffer_size() or not self.pool.try_reserve(size):
            return None
        try:
            return self._allocate(size)
        except MemoryError:
            self.pool.release(size)
            return None

    @abstractmethod
    def _allocate(self, size: int) -> DeviceBuffer:
        """Device-specific allocation of ``size`` already-reserved bytes."""

    def alloc_size(self, nbytes: int) -> int:
        """GET_ALLOC_SIZE for a tensor spanning ``nbytes``; devices that pad override this."""
        return nbytes

    def enter_compute_thread(self) -> None:
        """Called in the thread about to run this device's kernels, before they run (the graph
        engine's worker threads change from call to call); devices with per-thread settings
        apply them here."""
