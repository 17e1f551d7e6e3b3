"""REPEAT, REPEAT_BACK, CONCAT, PAD, PAD_REFLECT_1D, ROLL, UPSCALE: moving values between
layouts (spec/ops/layout.md).

Most of these ops only copy: their runners are numpy assignments between typed views of the
tensors (exact, strided as the tensors are, and safe when a client makes a destination share
bytes with its source: numpy copies the source first).  Two compute: REPEAT_BACK sums the
tiles of its source in float32, tile after tile as ggml-cpu does (:func:`repeat_back_f32`),
and UPSCALE resamples an image by nearest, bilinear (optionally antialiased) or bicubic
interpolation with ggml-cpu's float32 coordinates (:func:`upscale_f32`).  Each op has a
plain-numpy ``reference_*`` written from ggml's definition, which the tests compare with.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import overlaps
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.layout import (PLAIN, SCALE_ALIGN_CORNERS, SCALE_ANTIALIAS,
                                       SCALE_BILINEAR, pad_params)
from .cpu_tensors import rows_u8, view
from .parallel import sized_kernel

# -- REPEAT ------------------------------------------------------------------------------------


def tiles(out: np.ndarray, small: tuple) -> np.ndarray:
    """``out`` (n3, n2, n1, n0) seen as 8-D tiles (r3, s3, r2, s2, r1, s1, r0, s0) of the
    shape ``small`` = (s3, s2, s1, s0): the same elements, so never beyond ``out``."""
    shape, strides = [], []
    for n, s, st in zip(out.shape, small, out.strides):
        shape += [n // s, s]
        strides += [st * s, st]
    return np.lib.stride_tricks.as_strided(out, shape, strides, writeable=out.flags.writeable)


def reference_repeat(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Numpy oracle: ``a`` tiled to ``shape`` (both in (ne3, ne2, ne1, ne0) order)."""
    return np.tile(a, [n // s for n, s in zip(shape, a.shape)])


@kernel("cpu", Op.REPEAT)
def bind_repeat(node: Node):
    """REPEAT: every tile of dst gets src0 (one broadcast assignment)."""
    a, out = view(node.src[0]), view(node)
    if out.size == 0:
        return lambda: None
    t = tiles(out, a.shape)
    a8 = a[None, :, None, :, None, :, None, :]

    def run():
        t[...] = a8
    return run


# -- REPEAT_BACK ---------------------------------------------------------------------------------


@sized_kernel(1, cache=True, nogil=True)
def repeat_back_f32(a, out):
    """out[k] = Σ over the tiles t of a (in order, float32) of a[t·shape(out) + k]."""
    n3, n2, n1, n0 = out.shape
    r3, r2, r1, r0 = a.shape[0] // n3, a.shape[1] // n2, a.shape[2] // n1, a.shape[3] // n0
    for r in prange(n3 * n2 * n1):
        k3, k2, k1 = r // (n2 * n1), (r // n1) % n2, r % n1
        row = out[k3, k2, k1]
        for k0 in range(n0):
            row[k0] = np.float32(0.0)
        for i3 in range(r3):
            for i2 in range(r2):
                for i1 in range(r1):
                    src = a[i3 * n3 + k3, i2 * n2 + k2, i1 * n1 + k1]
                    for i0 in range(r0):
                        for k0 in range(n0):
                            row[k0] += src[i0 * n0 + k0]


def reference_repeat_back(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Numpy oracle: ``a`` summed over its tiles of ``shape`` (float64)."""
    split = []
    for n, s in zip(a.shape, shape):
        split += [n // s, s]
    return np.asarray(a, np.float64).reshape(split).sum(axis=(0, 2, 4, 6))


@kernel("cpu", Op.REPEAT_BACK)
def bind_repeat_back(node: Node):
    """REPEAT_BACK: the CPU runner of a validated node."""
    a, out = view(node.src[0]), view(node)
    if out.size == 0:
        return lambda: None
    if not overlaps(node, node.src[0]):
        return lambda: repeat_back_f32(a, out)

    def run():   # dst shares bytes with src0: sum into a scratch first
        tmp = np.empty(out.shape, np.float32)
        repeat_back_f32(a, tmp)
        out[...] = tmp
    return run


# -- CONCAT --------------------------------------------------------------------------------------


def reference_concat(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """Numpy oracle: ``a`` then ``b`` along ggml dimension ``dim``."""
    return np.concatenate([a, b], axis=3 - dim)


@kernel("cpu", Op.CONCAT)
def bind_concat(node: Node):
    """CONCAT: src0's values, then src1's, into their two parts of dst (plain types element
    by element, block types row bytes by row bytes)."""
    a, b = node.src[0], node.src[1]
    dim = node.param_i32(0)
    axis = 3 - dim
    if node.type in PLAIN:
        av, bv, out = view(a), view(b), view(node)
    else:   # packed rows of blocks: concatenate whole rows, or row bytes along dimension 0
        av, bv, out = rows_u8(a), rows_u8(b), rows_u8(node)
    cut = av.shape[axis]
    first = out[(slice(None),) * axis + (slice(0, cut),)]
    second = out[(slice(None),) * axis + (slice(cut, None),)]

    def run():
        first[...] = av
        second[...] = bv
    if overlaps(node, a) or overlaps(node, b):
        def run():   # noqa: F811 - a source shares bytes with dst: copy both first
            a_copy, b_copy = av.copy(), bv.copy()
            first[...] = a_copy
            second[...] = b_copy
    return run


# -- PAD, PAD_REFLECT_1D, ROLL --------------------------------------------------------------------


def reference_pad(a: np.ndarray, pads: list[int], circular: bool) -> np.ndarray:
    """Numpy oracle: ``a`` (ne3, ne2, ne1, ne0) padded by ``pads`` = [lp0, rp0, .., lp3, rp3]
    with zeros, or wrapped around when ``circular``."""
    width = [(pads[2 * d], pads[2 * d + 1]) for d in (3, 2, 1, 0)]
    return np.pad(a, width, mode="wrap" if circular else "constant")


def gather(out: np.ndarray, a: np.ndarray, index: list) -> "callable":
    """A runner setting ``out[i3, i2, i1, i0] = a[index[0][i3], .., index[3][i0]]`` (the
    indices checked by the validator to lie inside ``a``)."""
    grid = np.ix_(*[np.asarray(i, np.intp) for i in index])

    def run():
        out[...] = a[grid]
    return run


@kernel("cpu", Op.PAD)
def bind_pad(node: Node):
    """PAD: zeros around src0, or src0 repeated around itself (circular)."""
    a, out = view(node.src[0]), view(node)
    p = pad_params(node)
    if node.param_i32(8):
        index = [(np.arange(n) - p[2 * d]) % max(m, 1)
                 for d, n, m in zip((3, 2, 1, 0), out.shape, a.shape)]
        return gather(out, a, index)
    inner = out[tuple(slice(p[2 * d], p[2 * d] + m) for d, m in zip((3, 2, 1, 0), a.shape))]

    def run():
        src = a.copy() if overlaps(node, node.src[0]) else a
        out[...] = 0
        inner[...] = src
    return run


def reflect_index(n: int, p0: int, p1: int) -> np.ndarray:
    """Which source position each of the ``p0 + n + p1`` padded positions copies: the row
    mirrored at its first and last value (which are not repeated)."""
    k = np.arange(-p0, n + p1)
    k = np.where(k < 0, -k, k)
    return np.where(k >= n, 2 * (n - 1) - k, k)


def reference_pad_reflect_1d(a: np.ndarray, p0: int, p1: int) -> np.ndarray:
    """Numpy oracle: rows of ``a`` reflect-padded (numpy's ``reflect``)."""
    return np.pad(a, [(0, 0)] * 3 + [(p0, p1)], mode="reflect")


@kernel("cpu", Op.PAD_REFLECT_1D)
def bind_pad_reflect_1d(node: Node):
    """PAD_REFLECT_1D: every row mirrored at its ends."""
    a, out = view(node.src[0]), view(node)
    s = a.shape
    index = [np.arange(s[0]), np.arange(s[1]), np.arange(s[2]),
             reflect_index(s[3], node.param_i32(0), node.param_i32(1))]
    return gather(out, a, index)


def reference_roll(a: np.ndarray, shifts: list[int]) -> np.ndarray:
    """Numpy oracle: ``a`` rolled by ``shifts`` (ggml order: shift of dimension 0 first)."""
    return np.roll(a, shifts[::-1], axis=(0, 1, 2, 3))


@kernel("cpu", Op.ROLL)
def bind_roll(node: Node):
    """ROLL: dst[i] = src0[(i - shift) mod n] in every dimension."""
    a, out = view(node.src[0]), view(node)
    index = [(np.arange(n) - node.param_i32(d)) % max(n, 1)
             for d, n in zip((3, 2, 1, 0), a.shape)]
    return gather(out, a, index)


# -- UPSCALE ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def cubic_near(x, alpha):
    """Keys' cubic convolution weight for a sample at distance ``x`` <= 1 (float32)."""
    return ((alpha + np.float32(2.0)) * x - (alpha + np.float32(3.0))) * x * x + np.float32(1.0)


@njit(cache=True, nogil=True, inline="always")
def cubic_far(x, alpha):
    """Keys' cubic convolution weight for a sample at distance 1 < ``x`` < 2 (float32)."""
    f32 = np.float32
    return ((alpha * x - f32(5.0) * alpha) * x + f32(8.0) * alpha) * x - f32(4.0) * alpha


@sized_kernel(1, cache=True, nogil=True)
def upscale_f32(a, out, mode, antialias, pixel_offset, sf):
    """out = a resampled (mode 0 nearest, 1 bilinear, 2 bicubic) with float32 scale factors
    ``sf`` (dims 0..3) and ``pixel_offset`` (0.5, or 0 for aligned corners), as ggml-cpu:
    dimensions 2 and 3 always by nearest.  Source indices are clamped into ``a``."""
    n3, n2, n1, n0 = out.shape
    m3, m2, m1, m0 = a.shape
    f32 = np.float32
    po = f32(pixel_offset)
    sf0, sf1, sf2, sf3 = f32(sf[0]), f32(sf[1]), f32(sf[2]), f32(sf[3])
    one, zero = f32(1.0), f32(0.0)
    alpha = f32(-0.75)        # the bicubic convolution's a, as PyTorch
    for r in prange(n3 * n2 * n1):
        i3, i2, i1 = r // (n2 * n1), (r // n1) % n2, r % n1
        j3 = min(int(f32(i3) / sf3), m3 - 1)
        j2 = min(int(f32(i2) / sf2), m2 - 1)
        plane = a[j3, j2]
        row = out[i3, i2, i1]
        if mode == 0:
            j1 = min(int(f32(i1) / sf1), m1 - 1)
            for i0 in range(n0):
                row[i0] = plane[j1, min(int(f32(i0) / sf0), m0 - 1)]
        elif mode == 1 and antialias:
            support1 = max(one, one / sf1)
            support0 = max(one, one / sf0)
            inv1, inv0 = one / support1, one / support0
            y = (f32(i1) + po) / sf1
            y_lo = max(int(y - support1 + po), 0)
            y_hi = min(int(y + support1 + po), m1)
            for i0 in range(n0):
                x = (f32(i0) + po) / sf0
                x_lo = max(int(x - support0 + po), 0)
                x_hi = min(int(x + support0 + po), m0)
                val, total = zero, zero
                for sy in range(y_lo, y_hi):
                    wy = max(one - abs((f32(sy) - y + po) * inv1), zero)
                    for sx in range(x_lo, x_hi):
                        wx = max(one - abs((f32(sx) - x + po) * inv0), zero)
                        w = wx * wy
                        if w <= zero:
                            continue
                        val += plane[sy, sx] * w
                        total += w
                if total > zero:
                    val /= total
                row[i0] = val
        elif mode == 1:
            y = (f32(i1) + po) / sf1 - po
            y0 = int(np.floor(y))
            y1 = min(max(y0 + 1, 0), m1 - 1)
            y0 = min(max(y0, 0), m1 - 1)
            dy = min(max(y - f32(y0), zero), one)
            for i0 in range(n0):
                x = (f32(i0) + po) / sf0 - po
                x0 = int(np.floor(x))
                x1 = min(max(x0 + 1, 0), m0 - 1)
                x0 = min(max(x0, 0), m0 - 1)
                dx = min(max(x - f32(x0), zero), one)
                row[i0] = (plane[y0, x0] * (one - dx) * (one - dy) + plane[y0, x1] * dx * (one - dy)
                           + plane[y1, x0] * (one - dx) * dy + plane[y1, x1] * dx * dy)
        else:
            y = (f32(i1) + po) / sf1 - po
            y0 = int(np.floor(y))
            dy = y - f32(y0)
            wy0, wy1 = cubic_far(dy + one, alpha), cubic_near(dy, alpha)
            wy2, wy3 = cubic_near(one - dy, alpha), cubic_far(f32(2.0) - dy, alpha)
            rows = (plane[min(max(y0 - 1, 0), m1 - 1)], plane[min(max(y0, 0), m1 - 1)],
                    plane[min(max(y0 + 1, 0), m1 - 1)], plane[min(max(y0 + 2, 0), m1 - 1)])
            for i0 in range(n0):
                x = (f32(i0) + po) / sf0 - po
                x0 = int(np.floor(x))
                dx = x - f32(x0)
                wx0, wx1 = cubic_far(dx + one, alpha), cubic_near(dx, alpha)
                wx2, wx3 = cubic_near(one - dx, alpha), cubic_far(f32(2.0) - dx, alpha)
                c0, c1 = min(max(x0 - 1, 0), m0 - 1), min(max(x0, 0), m0 - 1)
                c2, c3 = min(max(x0 + 1, 0), m0 - 1), min(max(x0 + 2, 0), m0 - 1)
                val = zero
                for k in range(4):
                    line = rows[k]
                    p = line[c0] * wx0 + line[c1] * wx1 + line[c2] * wx2 + line[c3] * wx3
                    wk = wy0 if k == 0 else wy1 if k == 1 else wy2 if k == 2 else wy3
                    val += p * wk
                row[i0] = val


def upscale_factors(node: Node) -> tuple[list, float]:
    """UPSCALE's float32 scale factors (dst over src per dimension; with aligned corners,
    (n - 1)/(m - 1) in dimensions 0 and 1) and its pixel offset."""
    a = node.src[0]
    f32 = np.float32
    sf = [f32(f32(n) / f32(m)) if m else f32(1.0) for n, m in zip(node.ne, a.ne)]
    offset = 0.5
    if node.param_i32(0) & SCALE_ALIGN_CORNERS:
        offset = 0.0
        for d in (0, 1):
            if node.ne[d] > 1 and a.ne[d] > 1:
                sf[d] = f32(f32(node.ne[d] - 1) / f32(a.ne[d] - 1))
    return sf, offset


def reference_upscale(a: np.ndarray, shape: tuple, flags: int) -> np.ndarray:
    """Numpy oracle (float64, separable form): ``a`` resampled to ``shape`` by ggml's rule:
    nearest, bilinear (with clamped edges, or a triangle filter of width max(1, 1/scale)
    when antialiased) or bicubic (a = -0.75, clamped edges) in dimensions 0 and 1, nearest
    in 2 and 3; ``flags`` as UPSCALE's op_params[0]."""
    mode = flags & 0xFF
    po = 0.0 if flags & SCALE_ALIGN_CORNERS else 0.5
    out_n = shape[::-1]
    in_n = a.shape[::-1]
    sf = [n / m for n, m in zip(out_n, in_n)]
    if flags & SCALE_ALIGN_CORNERS:
        sf = [(n - 1) / (m - 1) if d < 2 and n > 1 and m > 1 else s
              for d, (s, n, m) in enumerate(zip(sf, out_n, in_n))]

    def matrix(d):   # (out, in) weights of dimension d
        n, m = out_n[d], in_n[d]
        w = np.zeros((n, m))
        for i in range(n):
            if d >= 2 or mode == 0:
                w[i, min(int(i / sf[d]), m - 1)] = 1
            elif mode == SCALE_BILINEAR and flags & SCALE_ANTIALIAS:
                support = max(1.0, 1 / sf[d])
                c = (i + po) / sf[d]
                taps = np.arange(m)
                t = np.maximum(1 - np.abs((taps - c + po) / support), 0)
                t[(taps < max(int(c - support + po), 0)) | (taps >= min(int(c + support + po), m))] = 0
                w[i] = t / t.sum() if t.sum() > 0 else 0
            elif mode == SCALE_BILINEAR:
                x = (i + po) / sf[d] - po
                x0 = int(np.floor(x))
                lo, hi = min(max(x0, 0), m - 1), min(max(x0 + 1, 0), m - 1)
                t = min(max(x - lo, 0.0), 1.0)
                w[i, lo] += 1 - t
                w[i, hi] += t
            else:
                x = (i + po) / sf[d] - po
                x0 = int(np.floor(x))
                t = x - x0
                al = -0.75
                ks = [((al * u - 5 * al) * u + 8 * al) * u - 4 * al for u in (t + 1,)] + \
                     [((al + 2) * u - (al + 3)) * u * u + 1 for u in (t, 1 - t)] + \
                     [((al * u - 5 * al) * u + 8 * al) * u - 4 * al for u in (2 - t,)]
                for j, k in enumerate(ks):
                    w[i, min(max(x0 - 1 + j, 0), m - 1)] += k
        return w
    x = np.asarray(a, np.float64)
    for d in range(4):
        x = np.moveaxis(np.tensordot(matrix(d), np.moveaxis(x, 3 - d, 0), axes=1), 0, 3 - d)
    return x


@kernel("cpu", Op.UPSCALE)
def bind_upscale(node: Node):
    """UPSCALE: the CPU runner of a validated node."""
    a, out = view(node.src[0]), view(node)
    if out.size == 0:
        return lambda: None
    flags = node.param_i32(0)
    sf, offset = upscale_factors(node)
    sf = np.asarray(sf, np.float32)
    args = (flags & 0xFF, bool(flags & SCALE_ANTIALIAS), offset, sf)
    if not overlaps(node, node.src[0]):
        return lambda: upscale_f32(a, out, *args)

    def run():
        tmp = np.empty(out.shape, np.float32)
        upscale_f32(a.copy(), tmp, *args)
        out[...] = tmp
    return run



# -- WIN_PART, WIN_UNPART ----------------------------------------------------------------------


def windows(image: np.ndarray, w: int) -> np.ndarray:
    """Numpy oracle and kernel of WIN_PART: ``image`` (H, W, C) zero-padded to whole w×w
    windows, the windows in row-major order: (npy·npx, w, w, C)."""
    h, wd, c = image.shape
    npx, npy = -(-wd // w), -(-h // w)
    padded = np.zeros((npy * w, npx * w, c), np.float32)
    padded[:h, :wd] = image
    return padded.reshape(npy, w, npx, w, c).transpose(0, 2, 1, 3, 4).reshape(npy * npx, w, w, c)


def unwindows(parts: np.ndarray, h: int, wd: int) -> np.ndarray:
    """Numpy oracle and kernel of WIN_UNPART: the (H, W, C) image from its windows ``parts``
    (npy·npx, w, w, C), padding dropped."""
    _, w, _, c = parts.shape
    npx, npy = -(-wd // w), -(-h // w)
    whole = parts.reshape(npy, npx, w, w, c).transpose(0, 2, 1, 3, 4).reshape(npy * w, npx * w, c)
    return whole[:h, :wd]


@kernel("cpu", Op.WIN_PART)
def bind_win_part(node: Node):
    """WIN_PART: the image's windows, by one padded copy."""
    a, out = view(node.src[0]), view(node)
    w = node.param_i32(2)

    def run():
        out[...] = windows(a[0], w)
    return run


@kernel("cpu", Op.WIN_UNPART)
def bind_win_unpart(node: Node):
    """WIN_UNPART: the image put back together from its windows."""
    a, out = view(node.src[0]), view(node)

    def run():
        out[0] = unwindows(a, out.shape[1], out.shape[2])
    return run


# -- GET_REL_POS, ADD_REL_POS ---------------------------------------------------------------------


def rel_pos_index(n: int) -> np.ndarray:
    """For queries q (rows) and keys k (columns), the table row q - k + n - 1."""
    q = np.arange(n)
    return q[:, None] - q[None, :] + n - 1


@kernel("cpu", Op.GET_REL_POS)
def bind_get_rel_pos(node: Node):
    """GET_REL_POS: rows of the table gathered by relative position (F16 bits copied)."""
    table, out = view(node.src[0]), view(node)
    index = rel_pos_index(node.ne[1])

    def run():
        out[0] = table[0, 0][index]
    return run


def reference_add_rel_pos(a: np.ndarray, pw: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """Numpy oracle: scores ``a`` (B, Q, n·n) plus ``ph`` (B, Q, n) along the first key axis
    and ``pw`` along the second (float64)."""
    b, q, nn = a.shape
    n = pw.shape[-1]
    s = np.asarray(a, np.float64).reshape(b, q, n, n)
    s = s + ph.reshape(b, q, n, 1) + pw.reshape(b, q, 1, n)
    return s.reshape(b, q, nn)


@kernel("cpu", Op.ADD_REL_POS)
def bind_add_rel_pos(node: Node):
    """ADD_REL_POS: scores[.., i, j] + ph[.., i] + pw[.., j] in float32, the two terms added
    in ggml-cpu's order (ph first where i <= j)."""
    a, pw_node, ph_node = node.src[0], node.src[1], node.src[2]
    n = pw_node.ne[0]
    shape = (a.ne[2], a.ne[1], n, n)
    av, out = view(a).reshape(shape), view(node).reshape(shape)
    pw = view(pw_node).reshape(a.ne[2], a.ne[1], 1, n)
    ph = view(ph_node).reshape(a.ne[2], a.ne[1], n, 1)
    ph_first = np.arange(n)[:, None] <= np.arange(n)[None, :]

    def run():
        out[...] = np.where(ph_first, (av + ph) + pw, (av + pw) + ph)
    return run
