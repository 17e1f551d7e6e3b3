"""Run single ggml ops on llama.cpp's own CPU backend, in process, as a test oracle.

The peer build's ``libggml-base.so`` and ``libggml-cpu.so`` are loaded with ctypes.  A
:class:`Context` wraps one ``ggml_context``: tensors are created in it and filled from numpy,
ops are built by calling the ggml functions by name, and :meth:`Context.compute` runs the graph
that ends in a given tensor with ``ggml_graph_compute_with_ctx`` and a thread count.  Nothing is
sent over a socket: this is the plain CPU backend (no repacked weights), the one
``ggml-rpc-server`` uses.

    cpu = GgmlCpu.load(peer_bin)
    with cpu.context() as ctx:
        w = ctx.tensor(GgmlType.Q8_0, (64, 3), raw_bytes)
        x = ctx.tensor(GgmlType.F32, (64, 5), values)            # numpy (5, 64)
        y = ctx.call("ggml_mul_mat", w, x)
        out = ctx.compute(y, n_threads=2)                          # numpy (1, 1, 5, 3)

Helpers for the common cases: :func:`mul_mat` and :func:`run_op` (any builder function).
Arguments to :meth:`Context.call` are converted by kind: a :class:`Tensor` or ``None`` becomes
a pointer, a Python ``float`` a C ``float``, a Python ``int`` a C ``int``, and a ctypes value is
passed as it is (use ``ctypes.c_int64`` for ``int64_t`` parameters).
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from refimpl.kernels.cpu_tensors import f32_to_bf16
from refimpl.protocol.ggml_types import GgmlType, type_traits

_LOADED: dict[str, "GgmlCpu"] = {}


class InitParams(C.Structure):
    """``struct ggml_init_params``."""
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def open_libraries(bin_dir: Path) -> tuple[C.CDLL, C.CDLL]:
    """``(libggml-base, libggml-cpu)`` of a peer build, with the signatures every user here
    needs declared (context, tensors, graph building and computing) and the CPU backend
    initialised.  (Both oracles, this module's and :mod:`.ggml_cpu_ops`, open them so.)"""
    base = C.CDLL(str(Path(bin_dir) / "libggml-base.so"), mode=C.RTLD_GLOBAL)
    cpu = C.CDLL(str(Path(bin_dir) / "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
    base.ggml_init.restype = C.c_void_p
    base.ggml_init.argtypes = [InitParams]
    base.ggml_free.argtypes = [C.c_void_p]
    base.ggml_new_tensor.restype = C.c_void_p
    base.ggml_new_tensor.argtypes = [C.c_void_p, C.c_int, C.c_int, C.POINTER(C.c_int64)]
    base.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
    base.ggml_get_data.restype = C.c_void_p
    base.ggml_get_data.argtypes = [C.c_void_p]
    base.ggml_nbytes.restype = C.c_size_t
    base.ggml_nbytes.argtypes = [C.c_void_p]
    cpu.ggml_graph_compute_with_ctx.restype = C.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [C.c_void_p, C.c_void_p, C.c_int]
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init.argtypes = []
    cpu.ggml_cpu_init()
    return base, cpu


class _CPlan(C.Structure):
    """``struct ggml_cplan`` (ggml-cpu.h of llama.cpp 0.3.36)."""

    _fields_ = [("work_size", C.c_size_t), ("work_data", C.c_void_p), ("n_threads", C.c_int),
                ("threadpool", C.c_void_p), ("abort_callback", C.c_void_p),
                ("abort_callback_data", C.c_void_p), ("use_ref", C.c_bool)]


class _TensorHead(C.Structure):
    """The leading fields of ``struct ggml_tensor`` (type, buffer, ne, nb)."""

    _fields_ = [("type", C.c_int), ("buffer", C.c_void_p), ("ne", C.c_int64 * 4),
                ("nb", C.c_size_t * 4)]


@dataclass(frozen=True)
class Tensor:
    """A tensor of a :class:`Context` (its ``struct ggml_tensor *``)."""

    ptr: int

    @property
    def _head(self) -> _TensorHead:
        return _TensorHead.from_address(self.ptr)

    @property
    def type(self) -> int:
        return int(self._head.type)

    @property
    def ne(self) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self._head.ne)

    @property
    def nb(self) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self._head.nb)


class GgmlCpu:
    """The two shared libraries of one peer build, loaded once per process."""

    def __init__(self, bin_dir: Path):
        self.base, self.cpu = open_libraries(bin_dir)
        b = self.base
        b.ggml_view_4d.restype = C.c_void_p
        b.ggml_view_4d.argtypes = [C.c_void_p, C.c_void_p] + [C.c_int64] * 4 + [C.c_size_t] * 4
        b.ggml_new_graph.restype = C.c_void_p
        b.ggml_new_graph.argtypes = [C.c_void_p]

    @classmethod
    def load(cls, bin_dir: Path) -> "GgmlCpu":
        """The libraries of ``bin_dir`` (loaded on first use, then shared)."""
        key = str(Path(bin_dir).resolve())
        if key not in _LOADED:
            _LOADED[key] = cls(Path(bin_dir))
        return _LOADED[key]

    def quantize(self, type_, values: np.ndarray) -> np.ndarray:
        """float32 rows ``values`` (n, k) quantised to ``type_`` by ggml itself
        (``ggml_quantize_chunk``, the function llama-quantize uses); uint8 (n, row_bytes)."""
        x = np.ascontiguousarray(values, np.float32)
        n, k = x.shape
        tr = type_traits(type_)
        out = np.zeros((n, k // tr.block_size * tr.type_size), np.uint8)
        fn = self.base.ggml_quantize_chunk
        fn.restype = C.c_size_t
        fn.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64,
                       C.c_void_p]
        fn(int(type_), x.ctypes.data, out.ctypes.data, 0, n, k, None)
        return out

    def context(self, mem_size: int = 256 << 20) -> "Context":
        """A fresh ggml context of ``mem_size`` bytes (tensors, graph and work buffer)."""
        return Context(self, mem_size)


def _tensor_bytes(type_: int, ne, values) -> bytes:
    """``values`` as the bytes of a contiguous tensor: floats are converted for F32, F16 and
    BF16 tensors; anything else (and any uint8 array) is taken as raw bytes."""
    arr = np.asarray(values)
    if arr.dtype == np.uint8 or type_ not in (GgmlType.F32, GgmlType.F16, GgmlType.BF16):
        return np.ascontiguousarray(arr).tobytes()
    if type_ == GgmlType.F32:
        return np.ascontiguousarray(arr, np.float32).tobytes()
    if type_ == GgmlType.F16:
        return np.ascontiguousarray(arr, np.float32).astype(np.float16).tobytes()
    return f32_to_bf16(np.asarray(arr, np.float32)).tobytes()


class Context:
    """One ``ggml_context``; use as a context manager (freed on exit)."""

    def __init__(self, lib: GgmlCpu, mem_size: int):
        self.lib = lib
        self.ptr = lib.base.ggml_init(InitParams(mem_size, None, False))
        if not self.ptr:
            raise MemoryError(f"ggml_init could not reserve {mem_size} bytes")

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the context and everything in it."""
        if self.ptr:
            self.lib.base.ggml_free(self.ptr)
            self.ptr = None

    # -- tensors ---------------------------------------------------------------------------
    def tensor(self, type_, ne: Sequence[int], values=None) -> Tensor:
        """A new contiguous tensor of ``type_`` and shape ``ne`` (ggml order, 1 to 4 dims),
        filled from ``values`` when given (see :func:`_tensor_bytes`)."""
        dims = (C.c_int64 * len(ne))(*ne)
        t = Tensor(self.lib.base.ggml_new_tensor(self.ptr, int(type_), len(ne), dims))
        if values is not None:
            self.write(t, values)
        return t

    def write(self, t: Tensor, values) -> None:
        """Fill a contiguous tensor from numpy values or raw bytes."""
        data = _tensor_bytes(t.type, t.ne, values)
        size = self.lib.base.ggml_nbytes(t.ptr)
        if len(data) != size:
            raise ValueError(f"{len(data)} bytes given for a tensor of {size} bytes")
        C.memmove(self.lib.base.ggml_get_data(t.ptr), data, size)

    def view(self, t: Tensor, ne: Sequence[int], nb: Sequence[int], offset: int = 0) -> Tensor:
        """``ggml_view_4d``: ``ne`` (4 values) and byte strides ``nb`` (nb[1..3] are used)."""
        return Tensor(self.lib.base.ggml_view_4d(self.ptr, t.ptr, *ne, *list(nb)[1:4], offset))

    def call(self, name: str, *args) -> Tensor:
        """Call the ggml function ``name`` with this context first; returns its tensor."""
        conv = []
        for a in args:
            if isinstance(a, Tensor):
                conv.append(C.c_void_p(a.ptr))
            elif a is None:
                conv.append(C.c_void_p(None))
            elif isinstance(a, bool):
                conv.append(C.c_bool(a))
            elif isinstance(a, float):
                conv.append(C.c_float(a))
            elif isinstance(a, int):
                conv.append(C.c_int(a))
            else:
                conv.append(a)
        fn = getattr(self.lib.base, name)
        fn.restype = C.c_void_p
        fn.argtypes = None
        ptr = fn(C.c_void_p(self.ptr), *conv)
        if not ptr:
            raise RuntimeError(f"{name} returned NULL")
        return Tensor(ptr)

    # -- running -------------------------------------------------------------------------------
    def compute(self, out: Tensor, n_threads: int = 1) -> np.ndarray:
        """Build the graph that ends in ``out``, run it on the CPU backend with ``n_threads``
        threads and return ``out`` as numpy (shape (ne3, ne2, ne1, ne0))."""
        graph = self.lib.base.ggml_new_graph(self.ptr)
        self.lib.base.ggml_build_forward_expand(graph, out.ptr)
        status = self.lib.cpu.ggml_graph_compute_with_ctx(self.ptr, graph, int(n_threads))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute_with_ctx failed with status {status}")
        return self.read(out)

    def runner(self, out: Tensor, n_threads: int = 1):
        """A callable that computes the graph ending in ``out`` again and again with one graph,
        plan and work buffer (``ggml_graph_plan`` + ``ggml_graph_compute``), for timing: the
        context's memory is not used up by repeated calls as with :meth:`compute`."""
        graph = self.lib.base.ggml_new_graph(self.ptr)
        self.lib.base.ggml_build_forward_expand(graph, out.ptr)
        cpu = self.lib.cpu
        cpu.ggml_graph_plan.restype = _CPlan
        cpu.ggml_graph_plan.argtypes = [C.c_void_p, C.c_int, C.c_void_p]
        cpu.ggml_graph_compute.restype = C.c_int
        cpu.ggml_graph_compute.argtypes = [C.c_void_p, C.POINTER(_CPlan)]
        plan = cpu.ggml_graph_plan(graph, int(n_threads), None)
        work = np.zeros(max(1, plan.work_size), np.uint8)
        plan.work_data = work.ctypes.data

        def run() -> None:
            status = cpu.ggml_graph_compute(graph, C.byref(plan))
            if status != 0:
                raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        run.keep = (work, plan)       # the work buffer lives as long as the runner
        return run

    def read(self, t: Tensor) -> np.ndarray:
        """A copy of a tensor's values: float32 for F32, F16 and BF16 (widened), raw uint8
        rows (ne3, ne2, ne1, row_bytes) for block types, numpy's type for integer types."""
        ne, nb, type_ = t.ne, t.nb, t.type
        tr = type_traits(type_)
        if not all(ne):
            row = ne[0] // tr.block_size * tr.type_size
            if tr.block_size > 1:
                return np.zeros((ne[3], ne[2], ne[1], row), np.uint8)
            return np.zeros((ne[3], ne[2], ne[1], ne[0]), np.float32)
        data = self.lib.base.ggml_get_data(t.ptr)
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + nb[0]
        buf = (C.c_char * span).from_address(data)
        if type_ in (GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.I32, GgmlType.I16,
                     GgmlType.I8):
            dt = {GgmlType.F32: np.float32, GgmlType.F16: np.float16, GgmlType.BF16: np.uint16,
                  GgmlType.I32: np.int32, GgmlType.I16: np.int16, GgmlType.I8: np.int8}[type_]
            arr = np.ndarray((ne[3], ne[2], ne[1], ne[0]), dt, buffer=buf,
                             strides=(nb[3], nb[2], nb[1], nb[0])).copy()
            if type_ == GgmlType.BF16:
                return (arr.astype(np.uint32) << 16).view(np.float32)
            return arr.astype(np.float32) if type_ == GgmlType.F16 else arr
        row = ne[0] // tr.block_size * tr.type_size
        return np.ndarray((ne[3], ne[2], ne[1], row), np.uint8, buffer=buf,
                          strides=(nb[3], nb[2], nb[1], 1)).copy()


# ------------------------------------------------------------------------------------------
# helpers


def run_op(lib: GgmlCpu, build: Callable[..., Tensor], inputs: Sequence[tuple],
           n_threads: int = 1, mem_size: int | None = None) -> np.ndarray:
    """Create one contiguous tensor per ``(type, ne, values)`` of ``inputs``, call
    ``build(ctx, *tensors)`` to make the op (it may add views), run it and return the result.

        out = run_op(lib, lambda ctx, a: ctx.call("ggml_rms_norm", a, 1e-6),
                     [(GgmlType.F32, (64, 3), x)], n_threads=2)
    """
    if mem_size is None:
        mem_size = (128 << 20) + 4 * sum(np.asarray(v).nbytes for _, _, v in inputs if v is not None)
    with lib.context(mem_size) as ctx:
        tensors = [ctx.tensor(t, ne, v) for t, ne, v in inputs]
        return ctx.compute(build(ctx, *tensors), n_threads)


def mul_mat(lib: GgmlCpu, w_type, w_values, w_ne: Sequence[int], x: np.ndarray,
            n_threads: int = 1, x_type=GgmlType.F32) -> np.ndarray:
    """``ggml_mul_mat(w, x)`` with contiguous operands: weights of ``w_type`` and shape
    ``w_ne`` (raw bytes for block types, float values otherwise), activations ``x`` numpy
    (B3, B2, T, K) or (T, K).  Returns float32 (B3, B2, T, N)."""
    x = np.asarray(x, np.float32)
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)
    x_ne = (x4.shape[3], x4.shape[2], x4.shape[1], x4.shape[0])
    w_ne = tuple(w_ne) + (1,) * (4 - len(w_ne))
    return run_op(lib, lambda ctx, w, a: ctx.call("ggml_mul_mat", w, a),
                  [(w_type, w_ne, w_values), (x_type, x_ne, x4)], n_threads)
