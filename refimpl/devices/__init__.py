"""Devices that hold tensor memory for the server, selected with ``--device``."""

from __future__ import annotations

from .base import Device, DeviceBuffer, DeviceUnavailable, MemoryPool
from .cpu import CpuDevice


def open_device(spec: str, *, capacity: int | None = None, threads: int | None = None) -> Device:
    """Open the device named ``spec``: ``cpu``, or ``cudaN`` (GPU N through numba.cuda).

    Raises :class:`DeviceUnavailable` with a one-line explanation when it cannot.
    """
    key = spec.strip().lower()
    if key == "cpu":
        return CpuDevice(capacity=capacity, threads=threads)
    if key.startswith("cuda"):
        from .cuda import open_cuda   # imports numba.cuda only when a GPU is asked for
        return open_cuda(spec, capacity=capacity)
    raise DeviceUnavailable(f"unknown device '{spec}' (available: cpu, cuda0, cuda1, ...)")


__all__ = ["Device", "DeviceBuffer", "DeviceUnavailable", "MemoryPool", "CpuDevice",
           "open_device"]
