"""SOFT_MAX: row-wise softmax with scale, an optional broadcast mask, ALiBi and sinks
(spec/ops/softmax.md).

``dst[r] = softmax(scale * src0[r] + slope(h) * mask[r'])``, where the softmax may include one
extra logit per head (the sink) that takes probability mass without producing an output.
Bit-exact with ggml's x86 AVX2 CPU backend: the masked term is added with a fused multiply-add,
``exp`` is ggml's 8-lane approximation (:func:`.numeric.vexp_f32`) on whole groups of eight and
libm's ``expf`` on the rest, each group is summed in float32 and the normaliser in float64, and
its reciprocal is applied in float32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..graph.build import Node
from ..graph.ops import Op
from ..graph.registry import kernel
from .cpu_tensors import load_f32, view
from .numeric import fma32, powf, vexp8_sub_f32
from .parallel import sized_kernel


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slopes (float32), computed in single precision as ggml's CPU backend does;
    all ones when ``max_bias`` is not positive."""
    slopes = np.ones(max(n_head, 0), dtype=np.float32)
    if n_head <= 0 or not max_bias > 0.0:
        return slopes
    f32 = np.float32
    n_head_log2 = 1 << int(math.floor(math.log2(n_head)))
    bias = f32(max_bias)
    with np.errstate(all="ignore"):
        m0 = powf(2.0, f32(-bias / f32(n_head_log2)))
        m1 = powf(2.0, f32(-(bias / f32(2.0)) / f32(n_head_log2)))
        for h in range(n_head):
            if h < n_head_log2:
                slopes[h] = powf(m0, h + 1)
            else:
                slopes[h] = powf(m1, 2 * (h - n_head_log2) + 1)
    return slopes


@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def softmax_f32(x, mask, sinks, out, scale, slopes, use_mask, use_sinks):
    """Row softmax of float32 ``x`` (n3, n2, n1, n0) into ``out`` (same shape, may be ``x``).

    ``mask`` (m3, m2, >=n1, n0) is indexed by row and by the head dims modulo its size;
    ``slopes`` (n2,) multiplies it; ``sinks`` (n2,) holds one extra logit per head.
    Bit-exact with ggml's AVX2 kernel: ``scale*x`` plus ``slope*mask`` in one fused
    multiply-add, ``exp`` by :func:`.numeric.vexp_f32` on whole groups of eight and by libm's
    ``expf`` on the rest of the row, each group summed in float32 (:func:`.numeric.hsum8_f32`)
    and the groups and leftovers in float64.
    """
    n3, n2, n1, n0 = x.shape
    m3, m2 = mask.shape[0], mask.shape[1]
    rows = n3 * n2 * n1
    n8 = n0 - n0 % 8
    for r in prange(rows):
        i3 = r // (n2 * n1)
        i2 = (r // n1) % n2
        i1 = r % n1
        w = np.empty(n0, np.float32)
        slope = slopes[i2]
        xr = x[i3, i2, i1]
        if use_mask:
            mr = mask[i3 % m3, i2 % m2, i1]
            for i0 in range(n0):
                w[i0] = fma32(slope, mr[i0], xr[i0] * scale)
        else:
            for i0 in range(n0):
                w[i0] = xr[i0] * scale
        mx = np.float32(-np.inf)
        for i0 in range(n0):
            v = w[i0]
            mx = mx if mx > v else v
        if use_sinks:
            sk = sinks[i2]
            mx = mx if mx > sk else sk
        total = 0.0
        for c in range(0, n8, 8):
            total += np.float64(vexp8_sub_f32(w, c, mx))
        for i0 in range(n8, n0):
            e = np.float32(math.exp(w[i0] - mx))
            w[i0] = e
            total += np.float64(e)
        if use_sinks:
            total += np.float64(np.float32(math.exp(sinks[i2] - mx)))
        inv = np.float32(1.0 / total)
        orow = out[i3, i2, i1]
        for i0 in range(n0):
            orow[i0] = w[i0] * inv


def reference(x: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0,
              max_bias: float = 0.0, sinks: np.ndarray | None = None) -> np.ndarray:
    """Numpy oracle: softmax over the last axis of ``x`` (ne3, ne2, ne1, ne0) in float64.

    ``mask`` has shape (m3, m2, >=ne1, ne0) and repeats over the two head dimensions;
    ``sinks`` has one logit per ``ne2`` index.
    """
    x = np.asarray(x, np.float64)
    n3, n2, n1, n0 = x.shape
    w = x * np.float64(np.float32(scale))
    if mask is not None:
        m = np.asarray(mask, np.float64)[:, :, :n1, :]
        m = np.tile(m, (n3 // m.shape[0], n2 // m.shape[1], 1, 1))
        slopes = alibi_slopes(n2, max_bias).astype(np.float64)
        w = w + slopes[None, :, None, None] * m
    mx = w.max(axis=-1, keepdims=True) if n0 else np.full(w.shape[:-1] + (1,), -np.inf)
    if sinks is not None:
        s = np.asarray(sinks, np.float64)[None, :, None, None]
        mx = np.maximum(mx, s)
    e = np.exp(w - mx)
    total = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(s - mx)
    return (e / total).astype(np.float32)


@kernel("cpu", Op.SOFT_MAX)
def bind_soft_max(node: Node):
    """SOFT_MAX (ggml_soft_max_ext, with optional sinks): the CPU runner of a validated node."""
    a = node.src[0]
    mask = node.src[1] if len(node.src) > 1 else None
    sinks = node.src[2] if len(node.src) > 2 else None
    scale = np.float32(node.param_f32(0))
    slopes = alibi_slopes(a.ne[2], node.param_f32(1))

    def run():
        x = view(a)
        m = np.ascontiguousarray(load_f32(mask)) if mask is not None else np.zeros((1, 1, 1, 1), np.float32)
        if sinks is not None:
            sk = np.ascontiguousarray(view(sinks)[0, 0, 0, :], dtype=np.float32)
        else:
            sk = np.zeros(1, np.float32)
        out = view(node)
        if np.may_share_memory(out, m) or np.may_share_memory(out, sk) or (
                np.may_share_memory(out, x) and out.__array_interface__["data"][0]
                != x.__array_interface__["data"][0]):
            tmp = np.empty(x.shape, np.float32)
            softmax_f32(x, m, sk, tmp, scale, slopes, mask is not None, sinks is not None)
            out[...] = tmp
        else:
            softmax_f32(x, m, sk, out, scale, slopes, mask is not None, sinks is not None)
    return run
