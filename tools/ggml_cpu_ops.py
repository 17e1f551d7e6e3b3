"""ggml's own CPU backend as an oracle for single ops, driven through ctypes.

The peer build's ``libggml-base.so`` and ``libggml-cpu.so`` are loaded into this process.  A
graph of one op is built with ggml's public constructors (``ggml_soft_max_ext``,
``ggml_rope_ext``, ``ggml_flash_attn_ext``, ...), computed with
``ggml_graph_compute_with_ctx`` on a chosen number of threads, and its result is read back as
float32.  Kernel tests hold refimpl's result to this one (tools.contract)::

    cpu = GgmlCpu(peer_bin)
    with cpu.graph() as g:
        x = g.tensor(values)                            # F32 by default, numpy order
        out = g.call("ggml_soft_max_ext", x, None, 0.125, 0.0)
        result = g.compute(out, n_threads=2)            # shape (ne3, ne2, ne1, ne0)

Only public ggml entry points are used, plus the first fields of ``struct ggml_tensor`` (type,
buffer, ne, nb, op, op_params), whose layout has been stable for a long time.  The results are
those of the peer build's machine code, which is built for the host: refimpl's kernels are
held to them by the numerics contract (spec/numerics.md, tests/kernels/test_ops_vs_ggml.py).
"""

from __future__ import annotations

import ctypes as C
from pathlib import Path

import numpy as np

from refimpl.kernels.cpu_tensors import bf16_to_f32, f32_to_bf16
from refimpl.protocol.ggml_types import GgmlType

from .ggml_cpu import InitParams, open_libraries

# Argument kinds: p = tensor (or None), f = float, i = int, b = bool, s = int[4] (sections).
# The result is a tensor unless the signature starts with "v:".
SIGNATURES = {
    "ggml_add": "ppp", "ggml_sub": "ppp", "ggml_mul": "ppp", "ggml_div": "ppp",
    "ggml_scale": "ppf", "ggml_scale_bias": "ppff",
    "ggml_soft_max_ext": "pppff", "ggml_soft_max_add_sinks": "v:pp",
    "ggml_unary": "ppi", "ggml_glu": "ppib", "ggml_glu_split": "pppi",
    "ggml_swiglu_oai": "pppff", "ggml_swiglu_clamp": "pppf", "ggml_xielu": "ppffff",
    "ggml_rms_norm": "ppf", "ggml_norm": "ppf",
    "ggml_rope_ext": "ppppiiiffffff", "ggml_rope_multi": "ppppisiiffffff",
    "ggml_flash_attn_ext": "pppppfff", "ggml_flash_attn_ext_add_sinks": "v:pp",
    "ggml_flash_attn_ext_set_prec": "v:pi",
    "ggml_set_rows": "pppp", "ggml_get_rows": "ppp", "ggml_cpy": "ppp",
}

_CTYPES = {"p": C.c_void_p, "f": C.c_float, "i": C.c_int, "b": C.c_bool,
           "s": C.POINTER(C.c_int)}


class _TensorHead(C.Structure):
    """The leading fields of ``struct ggml_tensor``."""
    _fields_ = [("type", C.c_int), ("buffer", C.c_void_p), ("ne", C.c_int64 * 4),
                ("nb", C.c_size_t * 4)]


class GgmlCpu:
    """The peer build's ggml CPU backend, loaded once per process."""

    _loaded: dict[str, tuple] = {}

    def __init__(self, bin_dir: str | Path):
        key = str(Path(bin_dir).resolve())
        if key not in self._loaded:
            base, cpu = open_libraries(Path(key))
            base.ggml_new_graph_custom.restype = C.c_void_p
            base.ggml_new_graph_custom.argtypes = [C.c_void_p, C.c_size_t, C.c_bool]
            for name, sig in SIGNATURES.items():
                fn = getattr(base, name)
                if sig.startswith("v:"):
                    fn.restype = None
                    sig = sig[2:]
                else:
                    fn.restype = C.c_void_p
                fn.argtypes = [_CTYPES[k] for k in sig]
            self._loaded[key] = (base, cpu)
        self.base, self.cpu = self._loaded[key]

    def graph(self, mem_bytes: int = 256 << 20) -> "OneGraph":
        """A fresh ggml context (tensors, graph and work buffer all live in it)."""
        return OneGraph(self, mem_bytes)


class OneGraph:
    """One ggml context holding the inputs and the op; use as a context manager."""

    def __init__(self, owner: GgmlCpu, mem_bytes: int):
        self.base, self.cpu = owner.base, owner.cpu
        self.ctx = self.base.ggml_init(InitParams(mem_bytes, None, False))
        if not self.ctx:
            raise MemoryError("ggml_init failed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Free the context."""
        if self.ctx:
            self.base.ggml_free(self.ctx)
            self.ctx = None

    def empty(self, type_: int, ne) -> int:
        """A new tensor of ggml shape ``ne`` (ne0 first), contents undefined."""
        ne = list(ne) + [1] * (4 - len(ne))
        arr = (C.c_int64 * 4)(*ne)
        t = self.base.ggml_new_tensor(self.ctx, int(type_), 4, arr)
        if not t:
            raise MemoryError("ggml_new_tensor failed")
        return t

    def tensor(self, values, type_: int = GgmlType.F32) -> int:
        """A new contiguous tensor holding ``values`` (numpy order: ne0 is the last axis)."""
        values = np.asarray(values)
        ne = values.shape[::-1] or (1,)
        t = self.empty(type_, ne)
        self.write(t, values)
        return t

    def write(self, t: int, values) -> None:
        """Overwrite a contiguous tensor's data with ``values`` converted to its type."""
        head = _TensorHead.from_address(t)
        ty = head.type
        if ty == GgmlType.F32:
            raw = np.ascontiguousarray(values, np.float32)
        elif ty == GgmlType.F16:
            with np.errstate(over="ignore"):
                raw = np.ascontiguousarray(np.asarray(values, np.float32).astype(np.float16))
        elif ty == GgmlType.BF16:
            raw = np.ascontiguousarray(f32_to_bf16(np.asarray(values, np.float32)))
        elif ty == GgmlType.I32:
            raw = np.ascontiguousarray(values, np.int32)
        elif ty == GgmlType.I64:
            raw = np.ascontiguousarray(values, np.int64)
        else:
            raw = np.ascontiguousarray(values, np.uint8)
        n = self.base.ggml_nbytes(t)
        if raw.nbytes != n:
            raise ValueError(f"{raw.nbytes} bytes of data for a {n}-byte tensor")
        C.memmove(self.base.ggml_get_data(t), raw.ctypes.data, n)

    def call(self, name: str, *args):
        """Call the ggml constructor ``name`` with this context first; tensors are ints or
        None, ``s`` arguments are sequences of four ints."""
        sig = SIGNATURES[name]
        void = sig.startswith("v:")
        kinds = sig[2:] if void else sig[1:]
        conv = [] if void else [self.ctx]
        for k, a in zip(kinds, args, strict=True):
            if k == "s":
                conv.append((C.c_int * 4)(*a))
            else:
                conv.append(a)
        return getattr(self.base, name)(*conv)

    def op_params_f32(self, t: int, first: int, stop: int) -> list[float]:
        """``op_params[first:stop]`` of a tensor, read as floats (what a constructor stored)."""
        at = t + C.sizeof(_TensorHead) + C.sizeof(C.c_int)     # after ``enum ggml_op op``
        return [float(v) for v in (C.c_float * 16).from_address(at)[first:stop]]

    def compute(self, out: int, n_threads: int = 1) -> np.ndarray:
        """Compute the graph ending in ``out`` and return its values as float32 (numpy order)."""
        g = self.base.ggml_new_graph_custom(self.ctx, 64, False)
        self.base.ggml_build_forward_expand(g, out)
        status = self.cpu.ggml_graph_compute_with_ctx(self.ctx, g, n_threads)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute_with_ctx returned {status}")
        return self.read(out)

    def read(self, t: int) -> np.ndarray:
        """A tensor's values as float32 (numpy order), honouring its strides; a contiguous
        block-format tensor as its bytes (uint8, flat)."""
        head = _TensorHead.from_address(t)
        if head.type not in (GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.I32):
            n = self.base.ggml_nbytes(t)
            return np.ctypeslib.as_array((C.c_uint8 * n).from_address(self.base.ggml_get_data(t))).copy()
        ne = tuple(head.ne)
        nb = tuple(head.nb)
        dt = {GgmlType.F32: np.float32, GgmlType.F16: np.float16, GgmlType.BF16: np.uint16,
              GgmlType.I32: np.int32}[head.type]
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dt).itemsize
        buf = (C.c_uint8 * span).from_address(self.base.ggml_get_data(t))
        arr = np.ndarray(ne[::-1], dtype=dt, buffer=buf, strides=nb[::-1]).copy()
        if head.type == GgmlType.BF16:
            return bf16_to_f32(arr)
        return arr.astype(np.float32) if dt != np.int32 else arr


__all__ = ["GgmlCpu", "OneGraph", "SIGNATURES"]
