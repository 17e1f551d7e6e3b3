"""GraphBuilder over a CUDA device: tensors live in one device buffer, written and read through
the buffer's own transfers (pinned staging), exactly as the server moves them."""

from __future__ import annotations

import numpy as np

from refimpl.kernels.cpu_tensors import f32_to_bf16
from refimpl.protocol.ggml_types import GgmlType, type_traits
from refimpl.protocol.tensor import tensor_nbytes
from tools.graphs import GraphBuilder, tensor_values


class CudaGraphBuilder(GraphBuilder):
    """A GraphBuilder whose arena is a buffer of ``device`` (a CudaDevice)."""

    def __init__(self, device, arena_bytes: int = 1 << 20):
        super().__init__(arena_bytes, device=device)

    def _span(self, t):
        return t.data - self.buf.base, tensor_nbytes(t.type, t.ne, t.nb)

    def write(self, t, values) -> None:
        at, n = self._span(t)
        if isinstance(values, (bytes, bytearray)) or (isinstance(values, np.ndarray)
                                                      and values.dtype == np.uint8):
            raw = np.frombuffer(bytes(values), np.uint8) if not isinstance(values, np.ndarray) \
                else values.ravel()
        else:
            arr = np.asarray(values)
            if t.type == GgmlType.F32:
                raw = arr.astype(np.float32).ravel().view(np.uint8)
            elif t.type == GgmlType.F16:
                raw = arr.astype(np.float16).ravel().view(np.uint8)
            elif t.type == GgmlType.BF16:
                raw = f32_to_bf16(arr.astype(np.float32).ravel()).view(np.uint8)
            elif t.type == GgmlType.I32:
                raw = arr.astype(np.int32).ravel().view(np.uint8)
            elif t.type == GgmlType.I64:
                raw = arr.astype(np.int64).ravel().view(np.uint8)
            else:
                raise TypeError(f"write(): give raw bytes for {type_traits(t.type).name}")
        assert raw.size == n, (raw.size, n)
        with self.buf.memory.write_region(at, n) as region:
            region.view[:] = raw.tobytes()

    def raw(self, t) -> np.ndarray:
        at, n = self._span(t)
        return np.frombuffer(bytes(self.buf.memory.read_region(at, n)), np.uint8).copy()

    def read(self, t) -> np.ndarray:
        """A contiguous tensor's values (see :func:`tools.graphs.tensor_values`)."""
        return tensor_values(t, self.raw(t))
