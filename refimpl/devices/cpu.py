"""The CPU device: buffers are numpy byte arrays in this process's memory."""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

from .base import Device, DeviceBuffer, WriteRegion

#: Alignment reported to clients: ggml's CPU backend uses 32 too, so layouts match.
CPU_ALIGNMENT = 32
#: Host alignment of the memory actually handed out (a cache line, good for SIMD kernels).
_HOST_ALIGNMENT = 64


def system_memory() -> tuple[int, int]:
    """``(available, total)`` physical memory of this machine in bytes."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return available, total


def cpu_model_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (or a generic description)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


#: Buffers from this size on are private anonymous mappings of their own.
LARGE_BUFFER_MIN = 4 << 20


def _zeroed_memory(size: int) -> np.ndarray:
    """``size`` zeroed bytes (uint8), freed when the last view of them goes.

    Large ones are a private anonymous mapping in 4 KiB pages, as ggml's CPU buffers are.
    Not ``mmap.mmap(-1, n)``: its default is a *shared* mapping, which Linux backs with
    shmem, whose page faults cost more.  Not ``np.zeros``: numpy advises transparent huge
    pages for large arrays.  Measured loading a 107 MB model into a fresh server (bench/README,
    "After the seventh session"), huge pages made the first upload anywhere from 10 % faster
    to 60 % slower, from one run to the next: on a virtual machine whose host reclaims the
    guest's free 2 MiB blocks, each huge page first touched may cost the host a fault too.
    4 KiB pages measured the same every run.
    """
    if size >= LARGE_BUFFER_MIN:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(region, dtype=np.uint8)
    return np.zeros(size, dtype=np.uint8)


class CpuBuffer(DeviceBuffer):
    """Host memory; every region view is the buffer's own memory (no copies)."""

    def __init__(self, device: "CpuDevice", size: int):
        super().__init__(device, size)
        raw = _zeroed_memory(size + _HOST_ALIGNMENT)     # zeroed: no stale data leaks
        start = (-raw.ctypes.data) % _HOST_ALIGNMENT
        self.array = raw[start:start + size]

    @contextlib.contextmanager
    def write_region(self, offset, size):
        """The buffer's own bytes: writes land in place."""
        yield WriteRegion(memoryview(self.array[offset:offset + size]))

    def read_region(self, offset, size):
        """The buffer's own bytes."""
        return memoryview(self.array[offset:offset + size])

    def fill(self, offset, size, value):
        """numpy fill of the region."""
        self.array[offset:offset + size] = value

    def copy_from(self, src, src_offset, dst_offset, size):
        """Copy from any buffer whose bytes the host can read."""
        if not isinstance(src, CpuBuffer):
            return False
        # numpy detects overlap between views of one array and copies through a temporary.
        self.array[dst_offset:dst_offset + size] = src.array[src_offset:src_offset + size]
        return True

    def _free(self):
        self.array = None


_blas_state: dict = {}


def set_blas_threads(n: int) -> None:
    """Let the BLAS library numpy uses (MUL_MAT's batched products) run ``n`` threads.
    threadpoolctl finds the library whichever numpy build is installed (OpenBLAS, MKL, ...),
    once; setting the count is one call into the library."""
    if "controller" not in _blas_state:
        from threadpoolctl import ThreadpoolController
        _blas_state["controller"] = ThreadpoolController().select(user_api="blas")
    for lib in _blas_state["controller"].lib_controllers:
        lib.set_num_threads(n)     # (limit() would restore the old count once collected)


class CpuDevice(Device):
    """The host processor.  ``capacity`` (bytes) defaults to the machine's physical memory."""

    alignment = CPU_ALIGNMENT

    def __init__(self, capacity: int | None = None, threads: int | None = None):
        _, total = system_memory()
        self.explicit_capacity = capacity is not None
        super().__init__(capacity if capacity is not None else total)
        self.name = "CPU"
        self.kind = "cpu"
        self.description = cpu_model_name()
        self.threads = threads
        if threads is not None:
            set_blas_threads(threads)

    def enter_compute_thread(self) -> None:
        """Give numba's parallel kernels and the BLAS library ``threads`` threads.
        ``numba.set_num_threads`` holds for the calling thread only, and graphs run in worker
        threads, so this is called in each of them before its kernels run.  The BLAS setting
        is process-wide; it is also made when the device is opened, in the main thread
        (OpenBLAS does not always take it from another thread)."""
        if self.threads is not None:
            import numba

            from ..kernels.parallel import set_compute_threads
            set_compute_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
            set_blas_threads(self.threads)

    def memory(self):
        """Free is what is neither reserved by buffers nor taken by the rest of the machine."""
        available, _ = system_memory()
        free = max(0, min(self.pool.available, available))
        return free, self.pool.capacity

    def allocate(self, size):
        """Refuse allocations the machine could not back, even under the capacity."""
        available, _ = system_memory()
        if size > available:
            return None
        return super().allocate(size)

    def _allocate(self, size):
        return CpuBuffer(self, size)
