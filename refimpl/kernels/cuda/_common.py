"""What every CUDA kernel module shares: how tensors are handed to kernels, launch shapes,
element loads and stores (F32, F16 natively, BF16 through its bits), and in-kernel
dequantisation of the block formats.

A tensor reaches a kernel as a flat device array over its whole buffer, of the element type
(``uint8`` for block formats), plus the element offset of element 0 and four element strides
(byte strides for block formats): ``targ(node, dtype)`` gives the six values.  The graph's
checks already guarantee that offsets and strides are multiples of the element size and that
every element lies in its buffer.  Every kernel walks its work with a grid-stride loop, so any
launch shape computes the same result; under the simulator (each CUDA thread is a Python
thread) launches are kept tiny.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.build import Node
from ...graph.checks import overlaps
from ...protocol.ggml_types import GgmlType
from ..cpu_tensors import STORAGE
from ..quants import (BF16_TABLE, F16_TABLE, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                      Q6_K, Q8_0, Q8_1)

#: True under NUMBA_ENABLE_CUDASIM=1.
SIM = type(cuda.gpus).__name__ == "FakeDeviceList"

#: Threads per block of elementwise kernels.
TPB = 4 if SIM else 256
#: Threads per block of kernels that reduce within a block (a power of two, at most SMEM).
RTPB = 4 if SIM else 128
#: Size of the per-block shared scratch arrays of reducing kernels.
SMEM = 128
#: Most blocks launched for a grid-stride loop.
_MAX_BLOCKS = 2 if SIM else 16384

F32, F16, BF16 = int(GgmlType.F32), int(GgmlType.F16), int(GgmlType.BF16)
I32, I64 = int(GgmlType.I32), int(GgmlType.I64)

#: Block formats the kernels dequantise (weights of MUL_MAT, sources of GET_ROWS and CPY).
DEQUANT_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K})


def device(fn):
    """``cuda.jit(device=True)`` for the GPU.  Under the simulator a device function is plain
    Python called from the kernel's Python: the simulator's own wrapper swaps module globals
    around every call, which is slow and, with many threads inside one device function,
    racy.  Device functions reach thread indices and barriers through :data:`kc`."""
    return fn if SIM else cuda.jit(device=True)(fn)


class _SimulatedThread:
    """The simulator's per-launch ``cuda`` module, found at each use (``threadIdx``,
    ``syncthreads``, ... of the calling simulated thread)."""

    def __getattr__(self, name):
        from numba.cuda.simulator.kernel import _get_kernel_context
        return getattr(_get_kernel_context(), name)


#: What device functions use for ``threadIdx``, ``blockDim``, ``syncthreads``: numba.cuda on
#: the GPU, the launch's simulated module under the simulator.
kc = _SimulatedThread() if SIM else cuda


def launch(n: int) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over ``n`` items."""
    return max(1, min(-(-n // TPB), _MAX_BLOCKS)), TPB


def launch_rows(n: int) -> tuple[int, int]:
    """(blocks, threads) for a block-per-item loop (items strided by the grid)."""
    return max(1, min(n, _MAX_BLOCKS if SIM else 65535)), RTPB


def device_of(node: Node):
    """The CudaDevice a node's buffer belongs to."""
    return node.buffer.memory.device


def storage(node: Node):
    """The numpy dtype a tensor's elements are stored as (uint8 for block formats)."""
    return STORAGE.get(node.type, np.uint8)


def is_bf16(node: Node) -> bool:
    """Whether loads and stores go through BF16 bits."""
    return node.type == GgmlType.BF16


def targ(node: Node, dtype=None, snapshot: bool = False) -> tuple:
    """``(flat, offset, s0, s1, s2, s3)`` for a kernel, in elements of ``dtype`` (default: the
    tensor's storage type; byte units for block formats).  With ``snapshot`` the tensor's
    bytes are first copied to a private allocation, so that a kernel writing an overlapping
    destination cannot change what it reads."""
    dt = np.dtype(dtype or storage(node))
    size = dt.itemsize
    mem = node.buffer.memory
    if snapshot and node.nbytes:
        padded = -(-node.nbytes // 16) * 16
        tmp = cuda.device_array(padded, dtype=np.uint8)
        mem.device.driver.device_to_device(tmp, mem.dev[node.offset:node.offset + node.nbytes],
                                           node.nbytes)
        flat = tmp if dt == np.uint8 else tmp.view(dt)
        off = 0
    else:
        flat = mem.typed(dt)
        off = node.offset // size
    return (flat, off) + tuple(s // size for s in node.nb)


def same_place(a: Node, b: Node) -> bool:
    """Same bytes, same element type and strides: element i of one is element i of the
    other (an elementwise kernel may then read and write in place)."""
    return (a.buffer.memory is b.buffer.memory and a.offset == b.offset and a.nb == b.nb
            and a.type == b.type and a.ne == b.ne)


def reads_safely(dst: Node, src: Node, elementwise: bool = True) -> bool:
    """Whether a kernel writing ``dst`` may read ``src`` in place."""
    if not overlaps(dst, src):
        return True
    return elementwise and same_place(dst, src)


_tables: dict = {}


def tables(device) -> tuple:
    """(F16 bits -> float32, BF16 bits -> float32) lookup tables on the device."""
    key = id(device)
    t = _tables.get(key)
    if t is None:
        device.activate()
        t = (cuda.to_device(F16_TABLE), cuda.to_device(BF16_TABLE))
        _tables[key] = t
    return t


def host_copy(node: Node, dtype) -> np.ndarray:
    """A tensor's values copied to the host: numpy (ne3, ne2, ne1, ne0) of ``dtype``."""
    mem = node.buffer.memory
    raw = np.zeros(max(node.nbytes, 1), np.uint8)
    if node.nbytes:
        mem.device.driver.device_to_host(raw, mem.dev[node.offset:node.offset + node.nbytes],
                                         node.nbytes)
    ne, nb = node.ne, node.nb
    if not node.nelements:
        return np.zeros((ne[3], ne[2], ne[1], ne[0]), dtype)
    return np.ndarray((ne[3], ne[2], ne[1], ne[0]), dtype=dtype, buffer=raw,
                      strides=(nb[3], nb[2], nb[1], nb[0])).copy()


def runner(node: Node, fn):
    """A runner that makes the node's GPU current in the calling thread, then calls ``fn``."""
    device = device_of(node)

    def run():
        device.activate()
        fn()
    return run


# ------------------------------------------------------------------------------------------
# device functions


@device
def lo(a, b):
    """The smaller of two numbers (numba's CUDA target does not compile builtin min)."""
    return a if a < b else b


@device
def hi(a, b):
    """The larger of two numbers."""
    return a if a > b else b


@device
def unravel(i, n0, n1, n2):
    """Flat row-major index -> (i0, i1, i2, i3)."""
    i0 = i % n0
    r = i // n0
    i1 = r % n1
    r = r // n1
    i2 = r % n2
    i3 = r // n2
    return i0, i1, i2, i3


@device
def ld(a, i, bf, bft):
    """Element ``i`` of ``a`` as float32; ``bf``: ``a`` holds BF16 bits, widened by ``bft``."""
    v = a[i]
    if bf:
        return bft[np.int32(v)]
    return np.float32(v)


@device
def bf16_bits(v):
    """float32 -> BF16 bits, rounding to nearest even (NaN stays a quiet NaN, its sign kept)."""
    sign = 0
    if math.copysign(1.0, v) < 0:
        sign = 0x8000
    a = abs(v)
    if a != a:
        return sign | 0x7FC0
    if a == math.inf:
        return sign | 0x7F80
    if a == 0:
        return sign
    m, e = math.frexp(a)
    if e >= -125:
        q = round(m * 256.0)
        if q == 256:
            q = 128
            e += 1
        big = e + 126
        if big >= 255:
            return sign | 0x7F80
        return sign | (big << 7) | (q - 128)
    return sign | round(math.ldexp(a, 133))


@device
def st(a, i, v, bf):
    """Store float32 ``v`` as element ``i`` of ``a`` (F16 by the native conversion, BF16 bits
    rounded to nearest even)."""
    if bf:
        a[i] = bf16_bits(v)
    else:
        a[i] = v


@device
def _f16_at(b, o, f16t):
    return f16t[np.int32(b[o]) | (np.int32(b[o + 1]) << 8)]


@device
def _u8(b, o):
    return np.int32(b[o])


@device
def _k4_scale_min(b, sb, j):
    if j < 4:
        return _u8(b, sb + j) & 63, _u8(b, sb + j + 4) & 63
    sc = (_u8(b, sb + j + 4) & 15) | ((_u8(b, sb + j - 4) >> 6) << 4)
    mn = (_u8(b, sb + j + 4) >> 4) | ((_u8(b, sb + j) >> 6) << 4)
    return sc, mn


@device
def _k3_scale(b, sb, s):
    if s < 8:
        low = _u8(b, sb + s) & 15
    else:
        low = _u8(b, sb + s - 8) >> 4
    high = (_u8(b, sb + 8 + s % 4) >> (2 * (s // 4))) & 3
    return (low | (high << 4)) - 32


@device
def dequant(code, b, ro, i, f16t):
    """Element ``i`` of the block-format row that starts at byte ``ro`` of ``b`` (uint8), as
    float32, exactly as ggml's ``dequantize_row_*`` computes it."""
    f32 = np.float32
    if code == Q4_0 or code == Q4_1 or code == Q5_0 or code == Q5_1 or code == Q8_0 \
            or code == Q8_1:
        j = i % 32
        if code == Q4_0:
            o = ro + (i // 32) * 18
            byte = _u8(b, o + 2 + j % 16)
            q = (byte & 15) if j < 16 else (byte >> 4)
            return f32(q - 8) * _f16_at(b, o, f16t)
        if code == Q4_1:
            o = ro + (i // 32) * 20
            byte = _u8(b, o + 4 + j % 16)
            q = (byte & 15) if j < 16 else (byte >> 4)
            return f32(q) * _f16_at(b, o, f16t) + _f16_at(b, o + 2, f16t)
        if code == Q5_0 or code == Q5_1:
            size = 22 if code == Q5_0 else 24
            o = ro + (i // 32) * size
            qh_at = o + 2 if code == Q5_0 else o + 4
            byte = _u8(b, qh_at + 4 + j % 16)
            q = (byte & 15) if j < 16 else (byte >> 4)
            hb = (_u8(b, qh_at + j // 8) >> (j % 8)) & 1
            q = q | (hb << 4)
            if code == Q5_0:
                return f32(q - 16) * _f16_at(b, o, f16t)
            return f32(q) * _f16_at(b, o, f16t) + _f16_at(b, o + 2, f16t)
        if code == Q8_0:
            o = ro + (i // 32) * 34
            q = _u8(b, o + 2 + j)
        else:
            o = ro + (i // 32) * 36
            q = _u8(b, o + 4 + j)
        if q >= 128:
            q -= 256
        return f32(q) * _f16_at(b, o, f16t)
    k = i % 256
    if code == Q4_K or code == Q5_K:
        size = 144 if code == Q4_K else 176
        o = ro + (i // 256) * size
        c = k // 64
        l = k % 32
        high = (k % 64) >= 32
        qs = o + 16 if code == Q4_K else o + 48
        byte = _u8(b, qs + 32 * c + l)
        q = (byte >> 4) if high else (byte & 15)
        if code == Q5_K:
            bit = 2 * c + (1 if high else 0)
            q = q | (((_u8(b, o + 16 + l) >> bit) & 1) << 4)
        sc, mn = _k4_scale_min(b, o + 4, k // 32)
        d1 = _f16_at(b, o, f16t) * f32(sc)
        m1 = _f16_at(b, o + 2, f16t) * f32(mn)
        return d1 * f32(q) - m1
    if code == Q6_K:
        o = ro + (i // 256) * 210
        n = k // 128
        r = k % 128
        l = r % 32
        quarter = r // 32
        h = _u8(b, o + 128 + 32 * n + l)
        if quarter == 0:
            q = (_u8(b, o + 64 * n + l) & 15) | ((h & 3) << 4)
        elif quarter == 1:
            q = (_u8(b, o + 64 * n + l + 32) & 15) | (((h >> 2) & 3) << 4)
        elif quarter == 2:
            q = (_u8(b, o + 64 * n + l) >> 4) | (((h >> 4) & 3) << 4)
        else:
            q = (_u8(b, o + 64 * n + l + 32) >> 4) | (((h >> 6) & 3) << 4)
        sc = _u8(b, o + 192 + k // 16)
        if sc >= 128:
            sc -= 256
        return (_f16_at(b, o + 208, f16t) * f32(sc)) * f32(q - 32)
    n = k // 128
    j = (k % 128) // 32
    l = k % 32
    g = k // 16
    if code == Q2_K:
        o = ro + (i // 256) * 84
        q = (_u8(b, o + 16 + 32 * n + l) >> (2 * j)) & 3
        sb = _u8(b, o + g)
        dl = _f16_at(b, o + 80, f16t) * f32(sb & 15)
        ml = _f16_at(b, o + 82, f16t) * f32(sb >> 4)
        return dl * f32(q) - ml
    # Q3_K
    o = ro + (i // 256) * 110
    low = (_u8(b, o + 32 + 32 * n + l) >> (2 * j)) & 3
    high = (_u8(b, o + l) >> (4 * n + j)) & 1
    q = low + 4 * high - 4
    return (_f16_at(b, o + 108, f16t) * f32(_k3_scale(b, o + 96, g))) * f32(q)


@device
def block_sum(sh, v):
    """Sum of ``v`` over the block's threads (every thread gets it); ``sh`` is shared scratch
    of at least blockDim.x entries.  Must be reached by every thread of the block."""
    t = kc.threadIdx.x
    sh[t] = v
    kc.syncthreads()
    s = kc.blockDim.x // 2
    while s > 0:
        if t < s:
            sh[t] = sh[t] + sh[t + s]
        kc.syncthreads()
        s //= 2
    total = sh[0]
    kc.syncthreads()
    return total


@device
def block_max(sh, v):
    """Maximum of ``v`` over the block's threads (like :func:`block_sum`)."""
    t = kc.threadIdx.x
    sh[t] = v
    kc.syncthreads()
    s = kc.blockDim.x // 2
    while s > 0:
        if t < s:
            a = sh[t]
            b = sh[t + s]
            sh[t] = a if a > b else b
        kc.syncthreads()
        s //= 2
    total = sh[0]
    kc.syncthreads()
    return total
