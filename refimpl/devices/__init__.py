"""Devices that hold tensor memory for the server, selected with ``--device``."""

from __future__ import annotations

from .base import Device, DeviceBuffer, DeviceUnavailable, MemoryPool
from .cpu import CpuDevice


def open_device(spec: str, *, capacity: int | None = None, threads: int | None = None) -> Device:
    """Open the device named ``spec`` (``cpu``; ``cudaN`` arrives in a later release).

    Raises :class:`DeviceUnavailable` with a one-line explanation when it cannot.
    """
    key = spec.strip().lower()
    if key == "cpu":
        return CpuDevice(capacity=capacity, threads=threads)
    if key.startswith("cuda"):
        raise DeviceUnavailable(
            f"device '{spec}': CUDA devices are not implemented in this version of refimpl "
            f"yet; use --device cpu")
    raise DeviceUnavailable(f"unknown device '{spec}' (available: cpu)")


__all__ = ["Device", "DeviceBuffer", "DeviceUnavailable", "MemoryPool", "CpuDevice",
           "open_device"]
