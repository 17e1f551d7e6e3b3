"""The CUDA device: buffers in GPU memory through numba.cuda (``--device cudaN``).

Every buffer is one plain device allocation (``cuda.device_array``, no managed memory), padded
to a multiple of 16 bytes so that it can be seen as an array of any element type.  The server
reaches it only through the four methods of :class:`~.base.DeviceBuffer`:

* ``write_region`` hands out pinned host memory (a small pool of ``cuda.pinned_array``
  staging buffers, page-locked so the copy is one DMA).  SET_TENSOR receives the socket's
  bytes straight into it, and every 4 MiB that have landed are copied to the device on a
  stream while the rest arrives (the network layer reports progress through
  ``WriteRegion.landed``); the hash cache reads its file straight into it, copied at the end;
* ``read_region`` copies the region into pinned staging that the buffer holds until its next
  read or write (GET_TENSOR sends from it, the hash cache hashes it);
* ``fill`` is the driver's memset and ``copy_from`` a device-to-device copy (overlapping
  regions of one buffer go through a temporary device allocation).

Under ``NUMBA_ENABLE_CUDASIM=1`` numba's CUDA simulator stands in for the GPU: the same calls
run on host memory, and kernels run as Python threads (slow, for tests).  Free and total
memory are then the host's, since that is where simulated device memory lives.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .base import Device, DeviceBuffer, DeviceUnavailable, WriteRegion
from .cpu import system_memory

#: Alignment reported to clients: ggml's CUDA backend reports 128 too.
CUDA_ALIGNMENT = 128
#: Device allocations are padded to this many bytes (any element type can view them).
_PAD = 16
#: Largest single pinned staging buffer; larger regions are staged in pageable memory.
STAGING_MAX = 64 << 20
#: Pinned staging memory a device keeps in its pool at most.
STAGING_POOL_MAX = 256 << 20
#: A pinned upload hands the GPU this many landed bytes at a time while the rest arrives.
UPLOAD_CHUNK = 4 << 20
#: Smallest staging buffer allocated (small transfers reuse it).
_STAGING_MIN = 1 << 20


def _numba_cuda():
    """numba's CUDA module (the simulator when NUMBA_ENABLE_CUDASIM=1 was set first)."""
    from numba import cuda
    return cuda


def simulated() -> bool:
    """True when numba.cuda is the CUDA simulator."""
    return type(_numba_cuda().gpus).__name__ == "FakeDeviceList"


def _one_line(exc: BaseException) -> str:
    """The first sentence of an exception's text, on one line."""
    text = " ".join(str(exc).split()).replace("Error at driver init: ", "")
    text = text.split(". ")[0].rstrip(". :")
    return text or type(exc).__name__


def _parse_index(spec: str) -> int:
    key = spec.strip().lower()
    digits = key[len("cuda"):]
    if not digits.isdigit():
        raise DeviceUnavailable(f"device '{spec}': expected cuda followed by a GPU index, "
                                f"e.g. cuda0")
    return int(digits)


class _Staging:
    """A pool of pinned host buffers for transfers (thread-safe)."""

    def __init__(self, cuda):
        self._cuda = cuda
        self._free: list[np.ndarray] = []
        self._pinned: list[np.ndarray] = []     # every pinned array this pool made
        self._pinned_bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> tuple[np.ndarray, bool]:
        """A uint8 host array of at least ``size`` bytes, and whether it is pinned (it is
        when it fits the pool)."""
        with self._lock:
            best = None
            for i, arr in enumerate(self._free):
                if arr.size >= size and (best is None or arr.size < self._free[best].size):
                    best = i
            if best is not None:
                return self._free.pop(best), True
            want = max(_STAGING_MIN, size)
            if size <= STAGING_MAX and self._pinned_bytes + want <= STAGING_POOL_MAX:
                try:
                    arr = self._cuda.pinned_array(want, dtype=np.uint8)
                except Exception:   # page-locking refused: pageable memory still works
                    return np.empty(size, np.uint8), False
                self._pinned_bytes += want
                self._pinned.append(arr)
                arr.flags.writeable = True
                return arr, True
        return np.empty(size, np.uint8), False

    def give(self, arr: np.ndarray | None) -> None:
        """Return an array obtained from :meth:`take` (pageable ones are simply dropped, so
        the pool holds pinned arrays only, at most STAGING_POOL_MAX bytes)."""
        if arr is None:
            return
        with self._lock:
            if (any(a is arr for a in self._pinned)
                    and not any(a is arr for a in self._free)):
                self._free.append(arr)


class _Upload(WriteRegion):
    """One write into a GPU buffer through host staging.

    With pinned staging, every :data:`UPLOAD_CHUNK` bytes that have landed are handed to the
    GPU's copy engine on a stream of this upload's own (an asynchronous copy, which only
    page-locked memory allows), so that the copy overlaps the network receiving the rest;
    :meth:`finish` copies what is left and :meth:`wait` waits for all of it.  Pageable
    staging (regions beyond :data:`STAGING_MAX`, or a refused page-lock) is copied once, at
    the end.
    """

    def __init__(self, buffer: "CudaBuffer", offset: int, host: np.ndarray, pinned: bool):
        super().__init__(memoryview(host))
        self._device = buffer.device
        self._dst = buffer._region(offset, host.size)
        self._host = host
        self._overlap = pinned
        self._sent = 0
        self._stream = None

    def landed(self, count):
        """Start copying the whole chunks among the first ``count`` bytes not yet sent."""
        if not self._overlap:
            return
        end = count - count % UPLOAD_CHUNK
        if end > self._sent:
            self._copy(end)

    def finish(self):
        """Copy the bytes not sent yet (the whole region where nothing overlapped)."""
        if self._sent < self._host.size:
            self._copy(self._host.size)

    def wait(self):
        """Block until every copy issued has completed (the staging may then be reused)."""
        if self._stream is not None:
            self._stream.synchronize()

    def _copy(self, end: int) -> None:
        device, start = self._device, self._sent
        device.activate()
        if self._overlap and self._stream is None:
            self._stream = device.cuda.stream()
        device.driver.host_to_device(self._dst[start:end], self._host[start:end], end - start,
                                     stream=self._stream or 0)
        self._sent = end


class CudaBuffer(DeviceBuffer):
    """One device allocation of ``size`` bytes (padded), zero-filled on the device."""

    def __init__(self, device: "CudaDevice", size: int):
        super().__init__(device, size)
        padded = max(_PAD, -(-size // _PAD) * _PAD)
        cuda = device.cuda
        device.activate()
        try:
            self.dev = cuda.device_array(padded, dtype=np.uint8)
        except Exception as exc:  # the driver's out-of-memory error
            if "OUT_OF_MEMORY" in str(exc).upper() or "out of memory" in str(exc).lower():
                raise MemoryError(str(exc)) from None
            raise
        device.driver.device_memset(self.dev, 0, padded)
        self._typed: dict = {}
        self._read_stage = None

    # -- what kernels see -------------------------------------------------------------------
    def typed(self, dtype) -> object:
        """The whole buffer as a flat device array of ``dtype`` (cached)."""
        dt = np.dtype(dtype)
        arr = self._typed.get(dt)
        if arr is None:
            arr = self.dev if dt == np.uint8 else self.dev.view(dt)
            self._typed[dt] = arr
        return arr

    def _region(self, offset: int, size: int):
        return self.dev[offset:offset + size]

    # -- the server's four operations ---------------------------------------------------------
    @contextlib.contextmanager
    def write_region(self, offset, size):
        """Pinned staging (an :class:`_Upload`): what has landed is copied to the device while
        the rest arrives, the remainder when the context exits normally."""
        self._drop_read_stage()
        stage, pinned = self.device.staging.take(size)
        upload = _Upload(self, offset, stage[:size], pinned)
        try:
            yield upload
            upload.finish()
        finally:
            upload.wait()
            self.device.staging.give(stage)

    def read_region(self, offset, size):
        """The region copied into pinned staging (valid until this buffer's next read or
        write)."""
        self._drop_read_stage()
        stage, _ = self.device.staging.take(size)
        self._read_stage = stage
        host = stage[:size]
        if size:
            self.device.activate()
            self.device.driver.device_to_host(host, self._region(offset, size), size)
        return memoryview(host)

    def fill(self, offset, size, value):
        """The driver's memset, on the device."""
        if size:
            self.device.activate()
            self.device.driver.device_memset(self._region(offset, size), value & 0xFF, size)

    def copy_from(self, src, src_offset, dst_offset, size):
        """Device-to-device copy from a buffer of the same GPU (False for any other buffer,
        as ggml's CUDA backend answers)."""
        if not isinstance(src, CudaBuffer) or src.device is not self.device:
            return False
        if not size:
            return True
        self.device.activate()
        drv = self.device.driver
        source = src._region(src_offset, size)
        if src is self and src_offset < dst_offset + size and dst_offset < src_offset + size:
            tmp = self.device.cuda.device_array(size, dtype=np.uint8)
            drv.device_to_device(tmp, source, size)
            source = tmp
        drv.device_to_device(self._region(dst_offset, size), source, size)
        return True

    def _drop_read_stage(self):
        stage, self._read_stage = self._read_stage, None
        if stage is not None:
            self.device.staging.give(stage)

    def _free(self):
        self._drop_read_stage()
        self._typed = {}
        self.dev = None
        self.device.release_pending()


class CudaDevice(Device):
    """GPU ``index`` through numba.cuda.  ``capacity`` (bytes) defaults to the GPU's total
    memory (the host's under the simulator)."""

    alignment = CUDA_ALIGNMENT

    def __init__(self, index: int = 0, capacity: int | None = None):
        self.cuda = _numba_cuda()
        from numba.cuda.cudadrv import driver
        self.driver = driver
        self.index = index
        self.kind = "cuda"
        self.name = f"CUDA{index}"
        self.simulated = simulated()
        self.explicit_capacity = capacity is not None
        self.activate()
        _, total = self._memory_info()
        super().__init__(capacity if capacity is not None else total)
        self.description = self._gpu_name()
        self.staging = _Staging(self.cuda)
        from ..graph.registry import load_kernels
        load_kernels("cuda")

    def activate(self) -> None:
        """Make this GPU's primary context current in the calling thread (numba keeps it
        current there afterwards; server threads come and go)."""
        self.cuda.current_context(self.index)

    def _gpu_name(self) -> str:
        if self.simulated:
            return "numba CUDA simulator (no GPU)"
        name = self.cuda.gpus[self.index].name
        return name.decode() if isinstance(name, bytes) else str(name)

    def _memory_info(self) -> tuple[int, int]:
        if self.simulated:
            return system_memory()
        self.activate()
        free, total = self.cuda.current_context(self.index).get_memory_info()
        return int(free), int(total)

    def memory(self):
        """Free is the GPU's free memory (after what other processes use), at most what
        ``-m`` leaves unreserved."""
        free, _ = self._memory_info()
        return max(0, min(self.pool.available, free)), self.pool.capacity

    def allocate(self, size):
        """Refuse what the GPU has not got free, even under the capacity."""
        free, _ = self._memory_info()
        if size > free:
            self.release_pending()
            free, _ = self._memory_info()
            if size > free:
                return None
        return super().allocate(size)

    def _allocate(self, size):
        return CudaBuffer(self, size)

    def release_pending(self) -> None:
        """Free device memory numba is holding back for deferred deallocation."""
        if self.simulated:
            return
        try:
            self.activate()
            self.cuda.current_context(self.index).deallocations.clear()
        except Exception:   # best effort: numba frees it later anyway
            pass


def open_cuda(spec: str, capacity: int | None = None) -> CudaDevice:
    """Open ``cudaN``; DeviceUnavailable with a one-line reason when this machine cannot."""
    index = _parse_index(spec)
    try:
        cuda = _numba_cuda()
    except Exception as exc:
        raise DeviceUnavailable(f"device '{spec}': numba.cuda cannot be loaded "
                                f"({_one_line(exc)})") from None
    if simulated():
        if index != 0:
            raise DeviceUnavailable(f"device '{spec}': the CUDA simulator "
                                    f"(NUMBA_ENABLE_CUDASIM=1) has only cuda0")
    else:
        try:
            count = len(cuda.gpus)
        except Exception as exc:
            reason = _one_line(exc)
            raise DeviceUnavailable(
                f"device '{spec}': no usable CUDA GPU on this machine ({reason}); use "
                f"--device cpu, or set NUMBA_ENABLE_CUDASIM=1 for numba's CUDA simulator") from None
        if count == 0:
            raise DeviceUnavailable(f"device '{spec}': no CUDA GPU on this machine; use "
                                    f"--device cpu")
        if index >= count:
            raise DeviceUnavailable(f"device '{spec}': this machine has {count} CUDA GPU(s) "
                                    f"(cuda0..cuda{count - 1})")
    try:
        return CudaDevice(index, capacity)
    except DeviceUnavailable:
        raise
    except Exception as exc:
        raise DeviceUnavailable(f"device '{spec}': cannot open the GPU ({_one_line(exc)})") from None
