"""The training and backward ops (spec/ops/training.md): SILU_BACK, RMS_NORM_BACK, OUT_PROD,
GET_ROWS_BACK, SOFT_MAX_BACK, CROSS_ENTROPY_LOSS, CROSS_ENTROPY_LOSS_BACK, OPT_STEP_ADAMW and
OPT_STEP_SGD.  (ROPE_BACK is :mod:`.rope`'s kernel with the angles negated.)

Each kernel computes what ggml's CPU backend computes, element by element in float32 as it
does, and its sums in float64 (as ggml's ``ggml_float`` where ggml uses it; where ggml adds in
float32 SIMD lanes the difference is rounding, which test-backend-ops' tolerance covers).  Kernels take 4-D numpy views
(ne3, ne2, ne1, ne0) with any strides; a result that shares bytes with a source it reads is
computed into a scratch array first, except where the op is defined in place (the optimiser
steps, element by element).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import load_f32, rows_u8, store_f32, view
from .get_rows import checked_indices
from .parallel import sized_kernel
from .quants import dequantize_rows

F32, F16 = GgmlType.F32, GgmlType.F16


def _shape(node: Node) -> tuple:
    return (node.ne[3], node.ne[2], node.ne[1], node.ne[0])


def _into(node: Node, compute, *sources: Node) -> None:
    """Call ``compute(out)`` on the F32 node's own view when it shares no byte with
    ``sources``, else on scratch that is then stored (converted to the node's type)."""
    if node.type == F32 and not any(overlaps(node, s) for s in sources):
        compute(view(node))
        return
    out = np.empty(_shape(node), np.float32)
    compute(out)
    store_f32(node, out)


# -- SILU_BACK -------------------------------------------------------------------------------

@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def silu_back_f32(dy, x, out):
    """out = dy · s · (1 + x · (1 − s)) with s = 1 / (1 + exp(−x)), in float32."""
    n3, n2, n1, n0 = x.shape
    one = np.float32(1.0)
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n0):
            v = x[i3, i2, i1, i0]
            s = one / (one + np.float32(math.exp(-v)))
            out[i3, i2, i1, i0] = dy[i3, i2, i1, i0] * s * (one + v * (one - s))


def reference_silu_back(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Numpy oracle of SILU_BACK in float64."""
    x = np.asarray(x, np.float64)
    s = 1.0 / (1.0 + np.exp(-x))
    return np.asarray(dy, np.float64) * s * (1.0 + x * (1.0 - s))


@kernel("cpu", Op.SILU_BACK)
def bind_silu_back(node: Node):
    """SILU_BACK (F32 or F16): the CPU runner of a validated node."""
    dy_t, x_t = node.src[0], node.src[1]

    def run():
        dy, x = load_f32(dy_t), load_f32(x_t)
        _into(node, lambda out: silu_back_f32(dy, x, out), dy_t, x_t)
    return run


# -- RMS_NORM_BACK ---------------------------------------------------------------------------

@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def rms_norm_back_f32(dz, x, out, eps):
    """Per row: ``out = (dz + x · (−Σx·dz / (Σx² + eps·n))) / sqrt(Σx²/n + eps)``; the sums of
    float32 products in float64, the rest in float32 as ggml rounds it."""
    n3, n2, n1, n0 = x.shape
    f32 = np.float32
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        sum_xx = 0.0
        sum_xdz = 0.0
        for i0 in range(n0):
            v = x[i3, i2, i1, i0]
            sum_xx += np.float64(v * v)
            sum_xdz += np.float64(v * dz[i3, i2, i1, i0])
        mean_eps = f32(sum_xx) / f32(n0) + eps
        sum_eps = f32(sum_xx) + eps * f32(n0)
        rrms = f32(1.0) / f32(math.sqrt(mean_eps))
        scale_x = f32(-sum_xdz) / sum_eps
        for i0 in range(n0):
            out[i3, i2, i1, i0] = (dz[i3, i2, i1, i0] + x[i3, i2, i1, i0] * scale_x) * rrms


def reference_rms_norm_back(dz: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """Numpy oracle in float64: the gradient of ``x / sqrt(mean(x²) + eps)`` given ``dz``."""
    x, dz = np.asarray(x, np.float64), np.asarray(dz, np.float64)
    mean_eps = np.mean(x * x, axis=-1, keepdims=True) + eps
    mean_xdz = np.mean(x * dz, axis=-1, keepdims=True)
    return (dz - x * mean_xdz / mean_eps) / np.sqrt(mean_eps)


# -- OUT_PROD --------------------------------------------------------------------------------

@sized_kernel(2, cache=True, nogil=True)
def out_prod_f32(a, b, out):
    """``out[i3, i2, i1, :] = Σ_j b[i3, i2, j, i1] · a[i3/r3, i2/r2, j, :]`` with ``a``
    (A3, A2, k, m) float32 values, ``b`` (B3, B2, k, n), ``out`` (B3, B2, n, m); added in
    float32 in the order of j, as ggml's ``ggml_vec_mad_f32`` does."""
    n3, n2, n1, n0 = out.shape
    a3, a2, k = a.shape[0], a.shape[1], a.shape[2]
    r3, r2 = n3 // a3, n2 // a2
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        acc = np.zeros(n0, np.float32)
        for j in range(k):
            s = b[i3, i2, j, i1]
            row = a[i3 // r3, i2 // r2, j]
            for i0 in range(n0):
                acc[i0] += row[i0] * s
        for i0 in range(n0):
            out[i3, i2, i1, i0] = acc[i0]


def reference_out_prod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Numpy oracle in float64: ``a`` (A3, A2, k, m) values, ``b`` (B3, B2, k, n) ->
    (B3, B2, n, m), ``a`` broadcast over the batch dimensions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r3, r2 = b.shape[0] // a.shape[0], b.shape[1] // a.shape[1]
    a = np.repeat(np.repeat(a, r3, axis=0), r2, axis=1)
    return np.swapaxes(b, -1, -2) @ a


@kernel("cpu", Op.OUT_PROD)
def bind_out_prod(node: Node):
    """OUT_PROD (src0 F32, F16 or a block format; src1 and dst F32): the CPU runner of a
    validated node.  Block-format rows are dequantised first, as ggml does row by row."""
    a_t, b_t = node.src[0], node.src[1]
    if node.nelements == 0:
        return lambda: None

    def values_of_a():
        if a_t.type in (F32, F16):
            return load_f32(a_t)
        return dequantize_rows(a_t.type, rows_u8(a_t), a_t.ne[0])

    return lambda: _into(node, lambda out: out_prod_f32(values_of_a(), view(b_t), out), a_t, b_t)


# -- GET_ROWS_BACK ---------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def get_rows_back_f32(grad, idx, out):
    """``out`` (n_rows, ne0) cleared, then ``out[idx[i]] += grad[i]`` for each i in order (a
    row named twice collects both), in float32."""
    out[:, :] = 0.0
    for i in range(idx.shape[0]):
        r = idx[i]
        for i0 in range(out.shape[1]):
            out[r, i0] += grad[i, i0]


def reference_get_rows_back(grad: np.ndarray, idx: np.ndarray, n_rows: int) -> np.ndarray:
    """Numpy oracle: ``grad`` (n, ne0) added into ``n_rows`` zero rows at ``idx``, float64."""
    out = np.zeros((n_rows, grad.shape[-1]))
    np.add.at(out, np.asarray(idx), np.asarray(grad, np.float64))
    return out


@kernel("cpu", Op.GET_ROWS_BACK)
def bind_get_rows_back(node: Node):
    """GET_ROWS_BACK (src0 F32 or F16, I32 indices, F32 dst): the CPU runner of a validated
    node; every index is checked against dst's rows right before the kernel runs."""
    a_t, b_t = node.src[0], node.src[1]

    def run():
        idx = checked_indices(node, b_t, node.ne[1]).reshape(-1)
        grad = load_f32(a_t)[0, 0, :idx.shape[0]]
        _into(node, lambda out: get_rows_back_f32(grad, idx, out[0, 0]), a_t, b_t)
    return run


# -- SOFT_MAX_BACK ---------------------------------------------------------------------------

@sized_kernel(0, cache=True, nogil=True)
def soft_max_back_f32(dy, y, out, scale):
    """Per row: ``out = scale · y · (dy − Σ y·dy)``; the dot product in float64, rounded."""
    n3, n2, n1, n0 = y.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        dot = 0.0
        for i0 in range(n0):
            dot += np.float64(y[i3, i2, i1, i0] * dy[i3, i2, i1, i0])
        d = np.float32(dot)
        for i0 in range(n0):
            out[i3, i2, i1, i0] = (dy[i3, i2, i1, i0] - d) * y[i3, i2, i1, i0] * scale


def reference_soft_max_back(dy: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Numpy oracle of SOFT_MAX_BACK in float64."""
    dy, y = np.asarray(dy, np.float64), np.asarray(y, np.float64)
    return scale * y * (dy - np.sum(y * dy, axis=-1, keepdims=True))


#: The row gradients of two F32 sources and one float parameter (``op_params[0]``).
_ROW_GRADIENTS = {Op.RMS_NORM_BACK: rms_norm_back_f32, Op.SOFT_MAX_BACK: soft_max_back_f32}


@kernel("cpu", Op.RMS_NORM_BACK, Op.SOFT_MAX_BACK)
def bind_row_gradients(node: Node):
    """RMS_NORM_BACK (F32; eps) and SOFT_MAX_BACK (F32; scale, max_bias 0): the CPU runner of
    a validated node."""
    grad_t, fwd_t = node.src[0], node.src[1]
    param = np.float32(node.param_f32(0))
    row_kernel = _ROW_GRADIENTS[node.op]
    return lambda: _into(node, lambda out: row_kernel(view(grad_t), view(fwd_t), out, param),
                         grad_t, fwd_t)


# -- CROSS_ENTROPY_LOSS and its gradient ------------------------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def cross_entropy_loss_f32(logits, labels):
    """``−(1/rows) Σ_rows Σ_i labels · (x − max − log Σ exp(x − max))``: each row's exp sum
    and dot product in float64, the log-softmax terms in float32, the total in float64."""
    n3, n2, n1, n0 = logits.shape
    total = 0.0
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                x, t = logits[i3, i2, i1], labels[i3, i2, i1]
                mx = x[0]
                for i0 in range(1, n0):
                    mx = max(mx, x[i0])
                s = 0.0
                for i0 in range(n0):
                    s += np.float64(math.exp(np.float32(x[i0] - mx)))
                log_sum = np.float32(math.log(s))
                row = 0.0
                for i0 in range(n0):
                    row += np.float64((np.float32(x[i0] - mx) - log_sum) * t[i0])
                total += row
    return np.float32(np.float32(total) * (np.float32(-1.0) / np.float32(n3 * n2 * n1)))


@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def cross_entropy_loss_back_f32(logits, labels, out, d_by_rows):
    """Per row: ``out = (softmax(logits) − labels) · d_by_rows``; the exp sum in float64."""
    n3, n2, n1, n0 = logits.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        x, o = logits[i3, i2, i1], out[i3, i2, i1]
        mx = x[0]
        for i0 in range(1, n0):
            mx = max(mx, x[i0])
        e = np.empty(n0, np.float32)
        s = 0.0
        for i0 in range(n0):
            e[i0] = np.float32(math.exp(np.float32(x[i0] - mx)))
            s += np.float64(e[i0])
        inv = np.float32(1.0 / s)
        for i0 in range(n0):
            o[i0] = (e[i0] * inv - labels[i3, i2, i1, i0]) * d_by_rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_cross_entropy_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Numpy oracle in float64: the mean over rows of ``−Σ labels · log_softmax(logits)``."""
    rows = np.prod(np.shape(logits)[:-1])
    return float(-(np.asarray(labels, np.float64) * _log_softmax(logits)).sum() / rows)


def reference_cross_entropy_loss_back(grad: float, logits: np.ndarray,
                                      labels: np.ndarray) -> np.ndarray:
    """Numpy oracle in float64: ``(softmax(logits) − labels) · grad / rows``."""
    rows = np.prod(np.shape(logits)[:-1])
    return (np.exp(_log_softmax(logits)) - np.asarray(labels, np.float64)) * grad / rows


@kernel("cpu", Op.CROSS_ENTROPY_LOSS)
def bind_cross_entropy_loss(node: Node):
    """CROSS_ENTROPY_LOSS (F32): the CPU runner of a validated node."""
    a_t, b_t = node.src[0], node.src[1]

    def run():
        loss = cross_entropy_loss_f32(view(a_t), view(b_t))
        view(node)[0, 0, 0, 0] = loss
    return run


@kernel("cpu", Op.CROSS_ENTROPY_LOSS_BACK)
def bind_cross_entropy_loss_back(node: Node):
    """CROSS_ENTROPY_LOSS_BACK (F32): the CPU runner of a validated node."""
    g_t, a_t, b_t = node.src[0], node.src[1], node.src[2]
    rows = np.float32(a_t.ne[1] * a_t.ne[2] * a_t.ne[3])

    def run():
        d_by_rows = np.float32(view(g_t)[0, 0, 0, 0] / rows)
        _into(node, lambda out: cross_entropy_loss_back_f32(view(a_t), view(b_t), out,
                                                            d_by_rows), g_t, a_t, b_t)
    return run


# -- the optimiser steps ---------------------------------------------------------------------

@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def adamw_step_f32(w, g, m, v, alpha, beta1, beta2, eps, keep, beta1h, beta2h):
    """One AdamW step in place, element by element in float32: the moments ``m``, ``v`` move
    towards ``g`` and ``g²``, and ``w = w · keep − alpha · m·beta1h / (sqrt(v·beta2h) + eps)``
    (``keep = 1 − alpha · wd``: decoupled weight decay)."""
    n3, n2, n1, n0 = w.shape
    one = np.float32(1.0)
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n0):
            gi = g[i3, i2, i1, i0]
            mi = m[i3, i2, i1, i0] * beta1 + gi * (one - beta1)
            vi = v[i3, i2, i1, i0] * beta2 + gi * gi * (one - beta2)
            m[i3, i2, i1, i0] = mi
            v[i3, i2, i1, i0] = vi
            mh = mi * beta1h
            vh = np.float32(math.sqrt(vi * beta2h)) + eps
            w[i3, i2, i1, i0] = w[i3, i2, i1, i0] * keep - alpha * mh / vh


@sized_kernel(0, cache=True, nogil=True)
def sgd_step_f32(w, g, alpha, keep):
    """One SGD step in place in float32: ``w = w · keep − alpha · g``."""
    n3, n2, n1, n0 = w.shape
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        for i0 in range(n0):
            w[i3, i2, i1, i0] = w[i3, i2, i1, i0] * keep - alpha * g[i3, i2, i1, i0]


def reference_adamw(w, g, m, v, params):
    """Numpy oracle in float64: (w, m, v) after one AdamW step with ``params`` = alpha,
    beta1, beta2, eps, wd, beta1h, beta2h."""
    alpha, beta1, beta2, eps, wd, beta1h, beta2h = (float(p) for p in params)
    w, g, m, v = (np.asarray(t, np.float64) for t in (w, g, m, v))
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + g * g * (1 - beta2)
    w = w * (1 - alpha * wd) - alpha * (m * beta1h) / (np.sqrt(v * beta2h) + eps)
    return w, m, v


def reference_sgd(w, g, params):
    """Numpy oracle in float64: w after one SGD step with ``params`` = alpha, wd."""
    alpha, wd = (float(p) for p in params)
    return np.asarray(w, np.float64) * (1 - alpha * wd) - alpha * np.asarray(g, np.float64)


def _hyper_parameters(t: Node) -> np.ndarray:
    """The optimiser's F32 hyper-parameters (a contiguous tensor) as float32 values."""
    return np.array(view(t), np.float32).reshape(-1)


@kernel("cpu", Op.OPT_STEP_ADAMW)
def bind_opt_step_adamw(node: Node):
    """OPT_STEP_ADAMW (F32): the CPU runner of a validated node; writes src0 (which the node
    views), src2 and src3."""
    w_t, g_t, m_t, v_t, p_t = node.src[:5]
    f32 = np.float32

    def run():
        alpha, beta1, beta2, eps, wd, beta1h, beta2h = _hyper_parameters(p_t)
        adamw_step_f32(view(w_t), view(g_t), view(m_t), view(v_t), alpha, beta1, beta2, eps,
                       f32(f32(1.0) - alpha * wd), beta1h, beta2h)
    return run


@kernel("cpu", Op.OPT_STEP_SGD)
def bind_opt_step_sgd(node: Node):
    """OPT_STEP_SGD (F32): the CPU runner of a validated node; writes src0 (which the node
    views)."""
    w_t, g_t, p_t = node.src[:3]

    def run():
        alpha, wd = _hyper_parameters(p_t)
        sgd_step_f32(view(w_t), view(g_t), alpha, np.float32(np.float32(1.0) - alpha * wd))
    return run
