"""IM2COL, IM2COL_3D, COL2IM_1D, CONV_2D, CONV_3D, CONV_2D_DW, CONV_TRANSPOSE_1D,
CONV_TRANSPOSE_2D, POOL_1D, POOL_2D, and the backward passes IM2COL_BACK and POOL_2D_BACK:
convolutions and pooling (spec/ops/conv.md).

Images are seen as 5-D float32 arrays ``x[n, c, z, y, x]`` (a 2-D image has one z, a 1-D
signal one y and one z) over the tensors' own strides.  One numba kernel,
:func:`im2col_rows`, copies the patches a kernel window covers into rows (zero where the
window hangs over the edge): that is IM2COL and IM2COL_3D themselves, and the first half of
CONV_2D and CONV_3D, whose second half is one matrix product per block of rows (numpy's
sgemm, float32) with the kernel's rows, as ggml-cpu computes them (with an F16 kernel, the
patches are rounded to F16 first, as ggml-cpu does).  The transposed convolutions multiply
first (every input position by every kernel tap) and then add the products into place
(:func:`scatter_taps`), in ggml-cpu's order.  Depthwise
convolution, pooling and COL2IM_1D are direct loops.  Every kernel checks the coordinates it
computes against the source's shape before it reads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.conv import POOL_AVG, params
from ..protocol.ggml_types import GgmlType
from .cpu_tensors import load_f32, store_f32, view
from .numeric import round_f16 as round_f16_scalar
from .parallel import sized_kernel

#: float32 values of patch rows held at once by the convolutions (64 MiB).
PATCH_BLOCK = 1 << 24


def as5d(a: np.ndarray, split: int = 0) -> np.ndarray:
    """A 4-D view (d3, d2, d1, d0) as 5-D: with ``split`` > 0, dimension 3 split into
    (d3 / split, split) (N·C images); without, a leading batch of one."""
    if not split:
        return a[None]
    st = a.strides
    return np.lib.stride_tricks.as_strided(
        a, (a.shape[0] // split, split) + a.shape[1:], (st[0] * split,) + st,
        writeable=False)


def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to F16 and back (ggml's FP32_TO_FP16: to nearest even)."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


# -- patches ---------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def position(q, od_n, oh_n, ow_n):
    """Output position number ``q`` (C order) as (n, od, oh, ow)."""
    ow = q % ow_n
    q //= ow_n
    oh = q % oh_n
    q //= oh_n
    return q // od_n, q % od_n, oh, ow


@sized_kernel(1, cache=True, nogil=True)
def im2col_rows(x, out, start, od_n, oh_n, ow_n, kd_n, kh_n, kw_n, s, p, d):
    """out[r] = the patch of output position ``start + r`` (n, od, oh, ow in C order): values
    x[n, ic, od·s2 + kd·d2 - p2, oh·s1 + kh·d1 - p1, ow·s0 + kw·d0 - p0] in (ic, kd, kh, kw)
    order, zero outside x."""
    _, ic_n, id_n, ih_n, iw_n = x.shape
    for r in prange(out.shape[0]):
        n, od, oh, ow = position(start + r, od_n, oh_n, ow_n)
        row = out[r]
        col = 0
        for ic in range(ic_n):
            for kd in range(kd_n):
                iz = od * s[2] + kd * d[2] - p[2]
                for kh in range(kh_n):
                    iy = oh * s[1] + kh * d[1] - p[1]
                    inside = 0 <= iz < id_n and 0 <= iy < ih_n
                    for kw in range(kw_n):
                        ix = ow * s[0] + kw * d[0] - p[0]
                        if inside and 0 <= ix < iw_n:
                            row[col] = x[n, ic, iz, iy, ix]
                        else:
                            row[col] = np.float32(0.0)
                        col += 1


def reference_im2col(x: np.ndarray, k: tuple, s: tuple, p: tuple, d: tuple) -> np.ndarray:
    """Numpy oracle: patches of ``x`` (N, C, D, H, W) for a window ``k`` = (KD, KH, KW), with
    strides, paddings and dilations in (w, h, d) order; shape (N, OD, OH, OW, C·KD·KH·KW)."""
    n, c, dd, hh, ww = x.shape
    kd, kh, kw = k
    pad = np.zeros((n, c, dd + 2 * p[2] + kd * d[2], hh + 2 * p[1] + kh * d[1],
                    ww + 2 * p[0] + kw * d[0]), np.float64)
    pad[:, :, p[2]:p[2] + dd, p[1]:p[1] + hh, p[0]:p[0] + ww] = x
    out_n = [(size + 2 * pp - dl * (kk - 1) - 1) // ss + 1
             for size, kk, ss, pp, dl in ((dd, kd, s[2], p[2], d[2]), (hh, kh, s[1], p[1], d[1]),
                                          (ww, kw, s[0], p[0], d[0]))]
    out = np.zeros((n, *out_n, c, kd, kh, kw))
    for a in range(kd):
        for b in range(kh):
            for e in range(kw):
                sl = pad[:, :, a * d[2]::s[2], b * d[1]::s[1], e * d[0]::s[0]]
                sl = sl[:, :, :out_n[0], :out_n[1], :out_n[2]]
                out[..., a, b, e] = sl.transpose(0, 2, 3, 4, 1)
    return out.reshape(n, *out_n, c * kd * kh * kw)


class Geometry:
    """Output positions and a kernel window over 5-D images: (OD, OH, OW), (KD, KH, KW) and
    strides, paddings, dilations in (w, h, d) order."""

    def __init__(self, out, win, s, p, d):
        self.out, self.win = tuple(out), tuple(win)
        self.s, self.p, self.d = (np.asarray(v, np.int64) for v in (s, p, d))

    def rows(self, n: int) -> int:
        """How many patch rows ``n`` images have."""
        return n * self.out[0] * self.out[1] * self.out[2]

    def fill(self, x: np.ndarray, out: np.ndarray, start: int) -> None:
        """out[:] = patch rows ``start``.. of ``x``."""
        im2col_rows(x, out, start, *self.out, *self.win, self.s, self.p, self.d)


def _image(node: Node, overlapped: bool):
    """A function returning ``node``'s values as float32, read when called (a copy when the
    destination overlaps them)."""
    def get():
        v = load_f32(node)
        return v.copy() if overlapped and node.type == GgmlType.F32 else v
    return get


@kernel("cpu", Op.IM2COL)
def bind_im2col(node: Node):
    """IM2COL: the patch rows of the image, into a contiguous F32 or F16 dst."""
    a, b = node.src[0], node.src[1]
    s0, s1, p0, p1, d0, d1, is_2d = params(node, 7)
    if is_2d:   # image (W, H, C, N): 5-D (N, C, 1, H, W); dst rows (N, OH, OW)
        geo = Geometry((1, node.ne[2], node.ne[1]), (1, a.ne[1], a.ne[0]),
                       (s0, s1, 1), (p0, p1, 0), (d0, d1, 1))
        image = _image(b, overlaps(node, b))

        return _rows_runner(node, geo, lambda: image()[:, :, None])
    # 1-D: image (W, C, N): 5-D (N, C, 1, 1, W); dst rows (N, OW)
    geo = Geometry((1, 1, node.ne[1]), (1, 1, a.ne[0]), (s0, 1, 1), (p0, 0, 0), (d0, 1, 1))
    image = _image(b, overlaps(node, b))

    def image5():
        return image()[0][:, :, None, None, :]
    return _rows_runner(node, geo, image5)


def _rows_runner(node: Node, geo: Geometry, image5):
    """Fill the contiguous dst (rows of patches) from the 5-D image ``image5()``: directly
    into an F32 dst, block by block through float32 for an F16 one."""
    if not node.nelements:
        return lambda: None
    out = view(node).reshape(-1, node.ne[0])
    if node.type == GgmlType.F32:
        return lambda: geo.fill(image5(), out, 0)

    def run():
        x5 = image5()
        block = max(1, PATCH_BLOCK // out.shape[1])
        buf = np.empty((min(block, out.shape[0]), out.shape[1]), np.float32)
        for start in range(0, out.shape[0], block):
            m = min(block, out.shape[0] - start)
            geo.fill(x5, buf[:m], start)
            with np.errstate(over="ignore"):
                out[start:start + m] = buf[:m]
    return run


@kernel("cpu", Op.IM2COL_3D)
def bind_im2col_3d(node: Node):
    """IM2COL_3D: the patch rows of N·IC volumes, into a contiguous F32 or F16 dst."""
    a, b = node.src[0], node.src[1]
    s0, s1, s2, p0, p1, p2, d0, d1, d2, ic = params(node, 10)
    n = b.ne[3] // ic
    od = node.ne[3] // n if n else 0
    geo = Geometry((od, node.ne[2], node.ne[1]), (a.ne[2], a.ne[1], a.ne[0]),
                   (s0, s1, s2), (p0, p1, p2), (d0, d1, d2))
    image = _image(b, overlaps(node, b))
    return _rows_runner(node, geo, lambda: as5d(image(), ic))


# -- convolutions as patches times kernel rows ------------------------------------------------


@sized_kernel(0, cache=True, nogil=True)
def scatter_rows(res, out, start):
    """out[n, oc, od, oh, ow] = res[r, oc] for the output positions r = start.. (C order)."""
    _, oc_n, od_n, oh_n, ow_n = out.shape
    for r in prange(res.shape[0]):
        n, od, oh, ow = position(start + r, od_n, oh_n, ow_n)
        for oc in range(oc_n):
            out[n, oc, od, oh, ow] = res[r, oc]


def _conv_runner(node: Node, geo: Geometry, image5, a: Node, out5):
    """Patches of ``image5()`` block by block, times the OC rows of the (contiguous) kernel
    ``a``, scattered into ``out5`` (N, OC, OD, OH, OW)."""
    f16 = a.type == GgmlType.F16
    kernel_values = _image(a, overlaps(node, a))
    total = geo.rows(out5.shape[0])
    oc = out5.shape[1]
    k = a.nelements // max(oc, 1)
    block = max(1, min(total, PATCH_BLOCK // max(k, 1)))

    def run():
        x5 = image5()
        weights = kernel_values().reshape(oc, k)
        buf = np.empty((block, k), np.float32)
        for start in range(0, total, block):
            m = min(block, total - start)
            geo.fill(x5, buf[:m], start)
            patches = round_f16(buf[:m]) if f16 else buf[:m]
            scatter_rows(np.matmul(patches, weights.T), out5, start)
    if not total or not k:
        return (lambda: out5.fill(0)) if total else (lambda: None)
    return run


@kernel("cpu", Op.CONV_2D)
def bind_conv_2d(node: Node):
    """CONV_2D: image (W, H, C, N) as 5-D (N, C, 1, H, W), kernel rows (OC, C·KH·KW)."""
    a, b = node.src[0], node.src[1]
    s0, s1, p0, p1, d0, d1 = params(node, 6)
    geo = Geometry((1, node.ne[1], node.ne[0]), (1, a.ne[1], a.ne[0]),
                   (s0, s1, 1), (p0, p1, 0), (d0, d1, 1))
    image = _image(b, overlaps(node, b))
    out5 = view(node)[:, :, None]
    return _conv_runner(node, geo, lambda: image()[:, :, None], a, out5)


@kernel("cpu", Op.CONV_3D)
def bind_conv_3d(node: Node):
    """CONV_3D: images (W, H, D, N·IC) as 5-D (N, IC, D, H, W), kernel rows (OC, IC·KD·KH·KW),
    dst (OW, OH, OD, N·OC) as (N, OC, OD, OH, OW)."""
    a, b = node.src[0], node.src[1]
    s0, s1, s2, p0, p1, p2, d0, d1, d2, ic, n, oc = params(node, 12)
    geo = Geometry((node.ne[2], node.ne[1], node.ne[0]), (a.ne[2], a.ne[1], a.ne[0]),
                   (s0, s1, s2), (p0, p1, p2), (d0, d1, d2))
    image = _image(b, overlaps(node, b))
    out = view(node)
    out5 = np.lib.stride_tricks.as_strided(
        out, (n, oc) + out.shape[1:], (out.strides[0] * oc,) + out.strides)
    return _conv_runner(node, geo, lambda: as5d(image(), ic), a, out5)


def reference_conv(x: np.ndarray, w: np.ndarray, s: tuple, p: tuple, d: tuple) -> np.ndarray:
    """Numpy oracle: ``x`` (N, C, D, H, W) convolved (cross-correlation) with ``w`` (OC, C,
    KD, KH, KW); result (N, OC, OD, OH, OW), float64."""
    oc, c, kd, kh, kw = w.shape
    cols = reference_im2col(x, (kd, kh, kw), s, p, d)
    res = cols @ w.reshape(oc, -1).T.astype(np.float64)
    return np.moveaxis(res, -1, 1)


# -- depthwise -------------------------------------------------------------------------------------


@sized_kernel(3, cache=True, nogil=True)
def conv_2d_dw_f32(x, k, out, s0, s1, p0, p1, d0, d1):
    """out[n, c, oy, ox] = Σ_(ky, kx) k[c, ky, kx] · x[n, c, oy·s1 + ky·d1 - p1, ox·s0 + kx·d0 -
    p0] over the taps inside x, in float32, taps in order."""
    n_n, c_n, oh_n, ow_n = out.shape
    ih, iw = x.shape[2], x.shape[3]
    kh_n, kw_n = k.shape[1], k.shape[2]
    for r in prange(n_n * c_n * oh_n):
        n, c, oy = r // (c_n * oh_n), (r // oh_n) % c_n, r % oh_n
        for ox in range(ow_n):
            acc = np.float32(0.0)
            for ky in range(kh_n):
                iy = oy * s1 + ky * d1 - p1
                if iy < 0 or iy >= ih:
                    continue
                for kx in range(kw_n):
                    ix = ox * s0 + kx * d0 - p0
                    if ix < 0 or ix >= iw:
                        continue
                    acc += k[c, ky, kx] * x[n, c, iy, ix]
            out[n, c, oy, ox] = acc


@kernel("cpu", Op.CONV_2D_DW)
def bind_conv_2d_dw(node: Node):
    """CONV_2D_DW: the CPU runner of a validated node (any layout, through strides)."""
    a, b = node.src[0], node.src[1]
    s0, s1, p0, p1, d0, d1 = params(node, 6)
    out = view(node)
    image = _image(b, overlaps(node, b))
    kernel_values = _image(a, overlaps(node, a))

    def run():
        k = kernel_values()[:, 0]   # (C, 1, KH, KW) -> (C, KH, KW)
        conv_2d_dw_f32(image(), k, out, s0, s1, p0, p1, d0, d1)
    return run


# -- transposed convolutions ------------------------------------------------------------------------


@sized_kernel(0, cache=True, nogil=True)
def scatter_taps(v, out, s, start, w_n):
    """out[oc, h·s + kh, w·s + kw] += v[oc, kh, kw, j] for the input positions q = start + j
    (h = q // w_n, w = q % w_n): in the order q, kh, kw, per output channel, as ggml-cpu."""
    oc_n, kh_n, kw_n, m = v.shape
    for oc in prange(oc_n):
        plane = out[oc]
        for j in range(m):
            q = start + j
            h, w = q // w_n, q % w_n
            for kh in range(kh_n):
                for kw in range(kw_n):
                    plane[h * s + kh, w * s + kw] += v[oc, kh, kw, j]


def _transposed_runner(node: Node, a: Node, image4, out4, s: int, taps: tuple):
    """Transposed convolution: per image of ``image4()`` (N, IC, H, W) and block of input
    positions, the products with every tap of kernel ``a`` (IC, OC·KH·KW) (input rounded to F16
    for an F16 kernel), added into ``out4`` (N, OC, OH, OW), zeroed first."""
    oc_n, kh_n, kw_n = taps
    ic_n = a.nelements // max(oc_n * kh_n * kw_n, 1)
    f16 = a.type == GgmlType.F16
    kernel_values = _image(a, overlaps(node, a))
    block = max(1, PATCH_BLOCK // max(oc_n * kh_n * kw_n, 1))

    def run():
        w = kernel_values().reshape(ic_n, oc_n * kh_n * kw_n)
        x = image4()
        out4.fill(0)
        if not w.size:
            return
        for n in range(x.shape[0]):
            xn = np.ascontiguousarray(x[n]).reshape(ic_n, -1)
            if f16:
                xn = round_f16(xn)
            for start in range(0, xn.shape[1], block):
                m = min(block, xn.shape[1] - start)
                v = np.matmul(w.T, xn[:, start:start + m]).reshape(oc_n, kh_n, kw_n, m)
                scatter_taps(v, out4[n], s, start, x.shape[3])
    return run


@kernel("cpu", Op.CONV_TRANSPOSE_1D)
def bind_conv_transpose_1d(node: Node):
    """CONV_TRANSPOSE_1D: kernel (K, OC, IC) as taps (OC, 1, K), input (L, IC) as one image
    (1, IC, 1, L), dst (T, OC) as (1, OC, 1, T)."""
    a, b = node.src[0], node.src[1]
    image = _image(b, overlaps(node, b))
    out4 = view(node)[0, 0][None, :, None, :]
    return _transposed_runner(node, a, lambda: image()[0, 0][None, :, None, :], out4,
                              node.param_i32(0), (a.ne[1], 1, a.ne[0]))


@kernel("cpu", Op.CONV_TRANSPOSE_2D)
def bind_conv_transpose_2d(node: Node):
    """CONV_TRANSPOSE_2D: kernel (KW, KH, OC, IC), images (W, H, IC, N), dst (OW, OH, OC, N)."""
    a, b = node.src[0], node.src[1]
    image = _image(b, overlaps(node, b))
    return _transposed_runner(node, a, image, view(node), node.param_i32(0),
                              (a.ne[2], a.ne[1], a.ne[0]))


def reference_conv_transpose(x: np.ndarray, w: np.ndarray, s: int) -> np.ndarray:
    """Numpy oracle (float64): ``x`` (N, IC, H, W) transposed-convolved with ``w`` (IC, OC, KH,
    KW), stride ``s``, no padding; (N, OC, (H-1)s + KH, (W-1)s + KW)."""
    n, ic, h, wd = x.shape
    _, oc, kh, kw = w.shape
    out = np.zeros((n, oc, (h - 1) * s + kh, (wd - 1) * s + kw))
    for y in range(h):
        for xx in range(wd):
            out[:, :, y * s:y * s + kh, xx * s:xx * s + kw] += np.einsum(
                "ni,iokl->nokl", x[:, :, y, xx].astype(np.float64), w.astype(np.float64))
    return out


# -- pooling ---------------------------------------------------------------------------------------


@sized_kernel(1, cache=True, nogil=True)
def pool_2d_f32(x, out, avg, k0, k1, s0, s1, p0, p1, divisor):
    """out[.., oy, ox] = max, or sum / ``divisor`` (0: the number of taps inside), of the
    k1×k1 window of x at (oy·s1 - p1, ox·s0 - p0), taps outside x skipped.  A 1-D pool is
    the case of one row (k1 = s1 = 1, p1 = 0)."""
    n3, n2, oh_n, ow_n = out.shape
    ih, iw = x.shape[2], x.shape[3]
    for r in prange(n3 * n2 * oh_n):
        i3, i2, oy = r // (n2 * oh_n), (r // oh_n) % n2, r % oh_n
        plane = x[i3, i2]
        iy0 = oy * s1 - p1
        for ox in range(ow_n):
            ix0 = ox * s0 - p0
            res = np.float32(0.0) if avg else np.float32(-3.4028234663852886e38)
            count = 0
            for ky in range(max(0, -iy0), min(k1, ih - iy0)):
                line = plane[iy0 + ky]
                for kx in range(max(0, -ix0), min(k0, iw - ix0)):
                    v = line[ix0 + kx]
                    if avg:
                        res += v
                    elif not v < res:
                        res = v
                    count += 1
            if avg:
                if divisor:
                    res = res / np.float32(divisor)
                else:
                    res = res / np.float32(count) if count > 0 else np.float32(0.0)
            out[i3, i2, oy, ox] = res


def reference_pool(x: np.ndarray, avg: bool, k: tuple, s: tuple, p: tuple, out_hw: tuple,
                   divide_by_taps: bool) -> np.ndarray:
    """Numpy oracle: 2-D pooling of ``x`` (.., H, W) into (.., OH, OW); windows of k = (k0,
    k1) at strides s and paddings p (w, h order), taps outside skipped; the average divides
    by k0·k1 or, with ``divide_by_taps``, by the taps inside."""
    oh, ow = out_hw
    out = np.zeros(x.shape[:-2] + (oh, ow))
    for y in range(oh):
        for xx in range(ow):
            y0, x0 = y * s[1] - p[1], xx * s[0] - p[0]
            win = x[..., max(y0, 0):max(y0 + k[1], 0), max(x0, 0):max(x0 + k[0], 0)]
            win = win.reshape(x.shape[:-2] + (-1,)).astype(np.float64)
            if avg:
                taps = win.shape[-1]
                div = taps if divide_by_taps else k[0] * k[1]
                out[..., y, xx] = win.sum(-1) / div if taps else 0
            else:
                out[..., y, xx] = win.max(-1) if win.shape[-1] else -np.finfo(np.float32).max
    return out


@kernel("cpu", Op.POOL_1D)
def bind_pool_1d(node: Node):
    """POOL_1D: rows pooled (average over the taps inside the row)."""
    a = node.src[0]
    op, k0, s0, p0 = params(node, 4)
    out = view(node)
    image = _image(a, overlaps(node, a))
    avg = op == POOL_AVG

    def run():
        x = image()
        n3, n2, n1, n0 = x.shape
        pool_2d_f32(x.reshape(n3, n2 * n1, 1, n0), out.reshape(n3, n2 * n1, 1, out.shape[3]),
                    avg, k0, 1, s0, 1, p0, 0, 0)
    return run


@kernel("cpu", Op.POOL_2D)
def bind_pool_2d(node: Node):
    """POOL_2D: planes pooled (average over the whole k0·k1 window)."""
    a = node.src[0]
    op, k0, k1, s0, s1, p0, p1 = params(node, 7)
    out = view(node)
    image = _image(a, overlaps(node, a))
    avg = op == POOL_AVG
    return lambda: pool_2d_f32(image(), out, avg, k0, k1, s0, s1, p0, p1, k0 * k1)


# -- COL2IM_1D -------------------------------------------------------------------------------------


@sized_kernel(1, cache=True, nogil=True)
def col2im_1d_f32(col, out, k_n, s, p):
    """out[oc, t] = Σ over t_in (increasing) with 0 <= t + p - t_in·s < K of
    col[t_in, oc·K + t + p - t_in·s], in float32."""
    oc_n, t_n = out.shape
    t_in_n = col.shape[0]
    for oc in prange(oc_n):
        for t in range(t_n):
            ta = t + p
            lo = max(0, -((k_n - 1 - ta) // s))      # ceil((ta - K + 1) / s), at least 0
            hi = min(ta // s, t_in_n - 1)
            acc = np.float32(0.0)
            for ti in range(lo, hi + 1):
                k = ta - ti * s
                if 0 <= k < k_n:
                    acc += col[ti, oc * k_n + k]
            out[oc, t] = acc


def reference_col2im_1d(col: np.ndarray, oc: int, s: int, p: int) -> np.ndarray:
    """Numpy oracle: columns ``col`` (T_in, K·OC) overlap-added: (OC, T_out), float64."""
    t_in, kk = col.shape
    k = kk // oc
    full = np.zeros((oc, (t_in - 1) * s + k))
    for t in range(t_in):
        full[:, t * s:t * s + k] += col[t].reshape(oc, k)
    return full[:, p:full.shape[1] - p]


@kernel("cpu", Op.COL2IM_1D)
def bind_col2im_1d(node: Node):
    """COL2IM_1D: the CPU runner of a validated node (F32, F16, BF16; float32 sums)."""
    a = node.src[0]
    s0, oc, p0 = params(node, 3)
    k = a.ne[0] // oc

    def run():
        col = load_f32(a)[0, 0]
        res = np.empty((oc, node.ne[0]), np.float32)
        col2im_1d_f32(col, res, k, s0, p0)
        store_f32(node, res.reshape(1, 1, oc, node.ne[0]))
    return run


# -- backward passes -------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def output_of(t, s, n_out):
    """The output position whose tap lands ``t`` places past its window start at stride
    ``s``: t / s when s divides t and it is in [0, n_out), else -1."""
    if t % s != 0:
        return -1
    o = t // s
    return o if 0 <= o < n_out else -1


@sized_kernel(1, cache=True, nogil=True)
def im2col_back_f32(grad, out, kh_n, kw_n, oh_n, ow_n, s0, s1, p0, p1, d0, d1):
    """out[n, ic, iy, ix] = Σ over taps (kh, kw), in order, of the patch value
    grad[(n·OH + oh)·OW + ow, (ic·KH + kh)·KW + kw] that IM2COL copied from (iy, ix), if any."""
    n_n, ic_n, ih_n, iw_n = out.shape
    for r in prange(n_n * ic_n * ih_n):
        n, ic, iy = r // (ic_n * ih_n), (r // ih_n) % ic_n, r % ih_n
        for ix in range(iw_n):
            acc = np.float32(0.0)
            for kh in range(kh_n):
                oh = output_of(iy + p1 - kh * d1, s1, oh_n)
                if oh < 0:
                    continue
                for kw in range(kw_n):
                    ow = output_of(ix + p0 - kw * d0, s0, ow_n)
                    if ow >= 0:
                        acc += grad[(n * oh_n + oh) * ow_n + ow, (ic * kh_n + kh) * kw_n + kw]
            out[n, ic, iy, ix] = acc


@kernel("cpu", Op.IM2COL_BACK)
def bind_im2col_back(node: Node):
    """IM2COL_BACK: the CPU runner of a validated node."""
    g, k = node.src[0], node.src[1]
    s0, s1, p0, p1, d0, d1, is_2d = params(node, 7)
    out = view(node) if is_2d else view(node)[0][:, :, None, :]   # (N, IC, IH, IW)
    kh = k.ne[1] if is_2d else 1
    oh = g.ne[2] if is_2d else 1
    grad = view(g).reshape(-1, g.ne[0])
    if not is_2d:
        s1, p1, d1 = 1, 0, 1

    def run():
        src = grad.copy() if overlaps(node, g) else grad
        im2col_back_f32(src, out, kh, k.ne[0], oh, g.ne[1], s0, s1, p0, p1, d0, d1)
    return run


def reference_im2col_back(grad: np.ndarray, shape: tuple, k: tuple, s: tuple, p: tuple,
                          d: tuple) -> np.ndarray:
    """Numpy oracle: the adjoint of IM2COL: ``grad`` (N, OH, OW, C·KH·KW) added back into an
    image of ``shape`` (N, C, H, W) for a window k = (KH, KW), (w, h)-ordered s, p, d."""
    n, c, h, w = shape
    kh, kw = k
    oh, ow = grad.shape[1], grad.shape[2]
    g = grad.reshape(n, oh, ow, c, kh, kw).astype(np.float64)
    out = np.zeros(shape)
    for y in range(oh):
        for x in range(ow):
            for a in range(kh):
                for b in range(kw):
                    iy, ix = y * s[1] + a * d[1] - p[1], x * s[0] + b * d[0] - p[0]
                    if 0 <= iy < h and 0 <= ix < w:
                        out[:, :, iy, ix] += g[:, y, x, :, a, b]
    return out


@sized_kernel(0, cache=True, nogil=True)
def pool_2d_back_f32(grad, fwd, out, avg, k0, k1, s0, s1, p0, p1, f16):
    """Per plane, in order: each gradient value grad[oy, ox] added to the first maximum of
    fwd in its window (max) or, divided by k0·k1, to every tap of the window inside the
    plane (average); out zeroed first; with ``f16`` every sum rounded to F16."""
    n3, n2, ih, iw = out.shape
    oh_n, ow_n = grad.shape[2], grad.shape[3]
    ka = np.float32(k0 * k1)
    for r in prange(n3 * n2):
        i3, i2 = r // n2, r % n2
        plane, f, g = out[i3, i2], fwd[i3, i2], grad[i3, i2]
        for y in range(ih):
            for x in range(iw):
                plane[y, x] = np.float32(0.0)
        for oy in range(oh_n):
            iy0 = oy * s1 - p1
            for ox in range(ow_n):
                ix0 = ox * s0 - p0
                g0 = g[oy, ox]
                if avg:
                    share = g0 / ka
                    for ky in range(max(0, -iy0), min(k1, ih - iy0)):
                        for kx in range(max(0, -ix0), min(k0, iw - ix0)):
                            plane[iy0 + ky, ix0 + kx] += share
                else:
                    best = np.float32(-3.4028234663852886e38)
                    by, bx = -1, -1
                    for ky in range(max(0, -iy0), min(k1, ih - iy0)):
                        for kx in range(max(0, -ix0), min(k0, iw - ix0)):
                            v = f[iy0 + ky, ix0 + kx]
                            if v <= best:     # NaN is taken, as in ggml-cpu
                                continue
                            best, by, bx = v, iy0 + ky, ix0 + kx
                    if by >= 0:
                        s = g0 + plane[by, bx]
                        plane[by, bx] = round_f16_scalar(s) if f16 else s


@kernel("cpu", Op.POOL_2D_BACK)
def bind_pool_2d_back(node: Node):
    """POOL_2D_BACK: the CPU runner of a validated node (F16 results held in float32,
    rounded after every sum as ggml-cpu stores them)."""
    g, af = node.src[0], node.src[1]
    op, k0, k1, s0, s1, p0, p1 = params(node, 7)
    f16 = node.type == GgmlType.F16

    def run():
        grad = load_f32(g).copy() if overlaps(node, g) else load_f32(g)
        fwd = load_f32(af)
        if overlaps(node, af) and not f16:
            fwd = fwd.copy()
        res = np.empty((node.ne[3], node.ne[2], node.ne[1], node.ne[0]), np.float32)
        pool_2d_back_f32(grad, fwd, res, op == POOL_AVG, k0, k1, s0, s1, p0, p1, f16)
        store_f32(node, res)
    return run


def reference_pool_2d_back(grad: np.ndarray, fwd: np.ndarray, avg: bool, k: tuple, s: tuple,
                           p: tuple) -> np.ndarray:
    """Numpy oracle (float64): POOL_2D_BACK of ``grad`` (.., OH, OW) for the forward input
    ``fwd`` (.., H, W)."""
    out = np.zeros(fwd.shape)
    h, w = fwd.shape[-2:]
    for idx in np.ndindex(*fwd.shape[:-2]):
        for oy in range(grad.shape[-2]):
            for ox in range(grad.shape[-1]):
                y0, x0 = oy * s[1] - p[1], ox * s[0] - p[0]
                ys = range(max(y0, 0), min(y0 + k[1], h))
                xs = range(max(x0, 0), min(x0 + k[0], w))
                gv = float(grad[idx + (oy, ox)])
                if avg:
                    for y in ys:
                        for x in xs:
                            out[idx + (y, x)] += gv / (k[0] * k[1])
                else:
                    taps = [(fwd[idx + (y, x)], y, x) for y in ys for x in xs]
                    taps = [t for t in taps if t[0] > -np.finfo(np.float32).max]
                    if taps:
                        best = max(taps, key=lambda t: t[0])   # the first maximum
                        out[idx + best[1:]] += gv
    return out
