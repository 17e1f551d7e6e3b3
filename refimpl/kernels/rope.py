"""ROPE and ROPE_BACK: rotary position embedding and its gradient (spec/ops/rope.md).

Each row of src0 (one head of one token) is rotated pairwise by angles that depend on the token's
position (src1, I32) and on the pair's index: ``theta_i = p * base^(-2i/n_dims)``, optionally
divided by per-pair frequency factors (src2) and blended by YaRN.  Normal mode rotates adjacent
pairs, NeoX and the multi-section modes rotate element ``i`` with ``i + n_dims/2``, vision mode
rotates ``i`` with ``i + n_dims`` across the whole row.

The angle table is built exactly as ggml's CPU backend builds it: in float32, the angle of pair
``i`` obtained by repeated multiplication with ``base^(-2/n_dims)``, then ``cosf``/``sinf``.
The rotation and YaRN's blend use fused multiply-adds where ggml's build does, so the result is
bit-exact.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..graph.build import Node
from ..graph.checks import (F32)
from ..graph.ops import Op
from ..graph.registry import kernel
from ..graph.validators.rope import (MODE_IMROPE, MODE_MROPE, MODE_NEOX, MODE_NORMAL,  # noqa: F401
                                        MODE_VISION, MODES, RopeParams)
from .cpu_tensors import load_f32, store_f32, view
from .numeric import fma32, powf
from .parallel import sized_kernel




def mrope_section(sector, imrope, s0, s1, s2):
    """Which of a token's four positions (0 time, 1 height, 2 width, 3 extra) rotates pair
    ``sector`` (its index modulo the sum of the sections) in the multi-section modes:
    contiguous sections, or for IMROPE interleaved ones (ggml's ``rope_yarn`` choice).

    Plain Python, compiled for the CPU (:data:`_mrope_section`) and for the GPU."""
    if imrope:
        if sector % 3 == 1 and sector < 3 * s1:
            return 1
        if sector % 3 == 2 and sector < 3 * s2:
            return 2
        if sector % 3 == 0 and sector < 3 * s0:
            return 0
        return 3
    if sector < s0:
        return 0
    if sector < s0 + s1:
        return 1
    if sector < s0 + s1 + s2:
        return 2
    return 3


_mrope_section = njit(cache=True, nogil=True, inline="always")(mrope_section)


@njit(cache=True, nogil=True)
def _fmax(a, b):
    return a if a > b else b


@njit(cache=True, nogil=True)
def _fmin(a, b):
    return a if a < b else b


@njit(cache=True, nogil=True, error_model="numpy")
def yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow):
    """YaRN's first and last corrected dimension, in float32 as ggml computes them."""
    f32 = np.float32
    two_pi = f32(2.0) * f32(math.pi)
    log_base = f32(2.0) * f32(math.log(freq_base))
    d0 = f32(n_dims) * f32(math.log(f32(n_ctx_orig) / (beta_fast * two_pi))) / log_base
    d1 = f32(n_dims) * f32(math.log(f32(n_ctx_orig) / (beta_slow * two_pi))) / log_base
    start = f32(np.floor(d0))
    end = f32(np.ceil(d1))
    return _fmax(f32(0.0), start), _fmin(f32(n_dims - 1), end)


@njit(cache=True, nogil=True, error_model="numpy")
def _yarn(theta_extrap, freq_scale, low, high, i0, ext_factor, mscale):
    """``cos`` and ``sin`` of one pair's angle, times the magnitude scale; float32 throughout
    (a float64 intermediate would make numba call ``cos`` instead of ``cosf``), with the two
    multiply-adds ggml's build fuses."""
    f32 = np.float32
    one = f32(1.0)
    theta_interp = freq_scale * theta_extrap
    theta = theta_interp
    if ext_factor != f32(0.0):
        y = (f32(i0 // 2) - low) / _fmax(f32(0.001), high - low)
        ramp = one - _fmin(one, _fmax(f32(0.0), y))
        ramp_mix = ramp * ext_factor
        theta = fma32(theta_interp, one - ramp_mix, theta_extrap * ramp_mix)
        mscale = mscale * fma32(f32(0.1), f32(math.log(one / freq_scale)), one)
    return f32(math.cos(theta)) * mscale, f32(math.sin(theta)) * mscale


@sized_kernel(0, cache=True, nogil=True, error_model="numpy")
def rope_cache(pos, ff, use_ff, n, n2, mode, sections, freq_scale, ext_factor, attn_factor,
               low, high, theta_scale):
    """Angle table (n2, n): ``[cos, sin]`` of pair ``i0/2`` at ``[i0, i0+1]`` for each token.

    ``pos`` holds n2 positions (n2*4 for the multi-section modes: time, height, width, extra).
    """
    f32 = np.float32
    cache = np.empty((n2, n), np.float32)
    is_multi = (mode & MODE_MROPE) != 0
    is_imrope = mode == MODE_IMROPE
    indep = mode == MODE_VISION
    s0, s1, s2, s3 = sections[0], sections[1], sections[2], sections[3]
    sect_dims = s0 + s1 + s2 + s3
    sec_w = s0 + s1
    sec_e = sec_w + s2
    for i2 in prange(n2):
        if not is_multi:
            theta = f32(pos[i2])
            for i0 in range(0, n, 2):
                f = ff[i0 // 2] if use_ff else f32(1.0)
                c, s = _yarn(theta / f, freq_scale, low, high, i0, ext_factor, attn_factor)
                cache[i2, i0] = c
                cache[i2, i0 + 1] = s
                theta = theta * theta_scale
        else:
            base_t = f32(pos[i2])
            base_h = f32(pos[i2 + n2])
            base_w = f32(pos[i2 + 2 * n2])
            base_e = f32(pos[i2 + 3 * n2])
            tt, th, tw, te = base_t, base_h, base_w, base_e
            for i0 in range(0, n, 2):
                f = ff[i0 // 2] if use_ff else f32(1.0)
                sector = (i0 // 2) % sect_dims
                if indep:
                    if sector == 0:
                        tt = base_t
                    elif sector == s0:
                        th = base_h
                    elif sector == sec_w:
                        tw = base_w
                    elif sector == sec_e:
                        te = base_e
                w = _mrope_section(sector, is_imrope, s0, s1, s2)
                theta = tt if w == 0 else th if w == 1 else tw if w == 2 else te
                c, s = _yarn(theta / f, freq_scale, low, high, i0, ext_factor, attn_factor)
                cache[i2, i0] = c
                cache[i2, i0 + 1] = s
                tt = tt * theta_scale
                th = th * theta_scale
                tw = tw * theta_scale
                te = te * theta_scale
    return cache


@sized_kernel(0, cache=True, nogil=True)
def rope_rows(x, out, cache, n_dims, n_offs, mode):
    """Rotate every row of ``x`` (n3, n2, n1, n0) into ``out`` using ``cache`` (n2, ·).

    Elements outside the rotated window are copied.  ``out`` may be ``x`` itself.
    """
    n3, n2, n1, n0 = x.shape
    rows = n3 * n2 * n1
    for r in prange(rows):
        i3 = r // (n2 * n1)
        i2 = (r // n1) % n2
        i1 = r % n1
        if mode == MODE_VISION:
            for i0 in range(0, n0, 2):
                ic = i0 // 2
                c = cache[i2, i0]
                s = cache[i2, i0 + 1]
                x0 = x[i3, i2, i1, ic]
                x1 = x[i3, i2, i1, ic + n_dims]
                out[i3, i2, i1, ic] = fma32(x0, c, -(x1 * s))
                out[i3, i2, i1, ic + n_dims] = fma32(x0, s, x1 * c)
            continue
        for i0 in range(0, n_offs):
            out[i3, i2, i1, i0] = x[i3, i2, i1, i0]
        if mode == MODE_NORMAL:
            for i0 in range(0, n_dims, 2):
                c = cache[i2, i0]
                s = cache[i2, i0 + 1]
                x0 = x[i3, i2, i1, n_offs + i0]
                x1 = x[i3, i2, i1, n_offs + i0 + 1]
                out[i3, i2, i1, n_offs + i0] = fma32(x0, c, -(x1 * s))
                out[i3, i2, i1, n_offs + i0 + 1] = fma32(x0, s, x1 * c)
        else:
            half = n_dims // 2
            for i0 in range(0, n_dims, 2):
                ic = n_offs + i0 // 2
                c = cache[i2, i0]
                s = cache[i2, i0 + 1]
                x0 = x[i3, i2, i1, ic]
                x1 = x[i3, i2, i1, ic + half]
                out[i3, i2, i1, ic] = fma32(x0, c, -(x1 * s))
                out[i3, i2, i1, ic + half] = fma32(x0, s, x1 * c)
        for i0 in range(n_offs + n_dims, n0):
            out[i3, i2, i1, i0] = x[i3, i2, i1, i0]


def _angle_constants(p: RopeParams, n0: int) -> tuple:
    """What :func:`rope_cache` needs besides the positions and frequency factors, fixed by the
    node's parameters (computed once, when the node is bound)."""
    f32 = np.float32
    with np.errstate(all="ignore"):
        theta_scale = powf(p.freq_base, f32(f32(-2.0) / f32(p.n_dims)))
    low, high = yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow)
    n = n0 if p.mode == MODE_VISION else p.n_dims
    return (n, p.mode, np.array(p.sections, np.int64), p.freq_scale, p.ext_factor,
            p.attn_factor, f32(low), f32(high), theta_scale)


#: :func:`_angle_constants` by (n0, op_params[1:16]): a model's ROPE nodes share a few.
_CONSTANTS: dict = {}


def _shared_constants(p: RopeParams, n0: int, params: tuple) -> tuple:
    """:func:`_angle_constants`, computed once per distinct parameters (a graph's sixty ROPE
    nodes have one or two); the tuple is only read, never changed."""
    key = (n0, params)
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) >= 256:
            _CONSTANTS.clear()
        found = _CONSTANTS[key] = _angle_constants(p, n0)
    return found


def _angles(p: RopeParams, pos: np.ndarray, ff: np.ndarray | None, n0: int, n2: int,
            constants: tuple | None = None) -> np.ndarray:
    """The cos/sin cache of every position (:func:`rope_cache`)."""
    n, mode, sections, freq_scale, ext, attn, low, high, theta_scale = \
        constants or _angle_constants(p, n0)
    use_ff = ff is not None
    ffa = ff if use_ff else np.ones(1, np.float32)
    return rope_cache(pos, ffa, use_ff, n, n2, mode, sections, freq_scale, ext, attn, low,
                      high, theta_scale)


def reference(x: np.ndarray, pos: np.ndarray, n_dims: int, mode: int = MODE_NORMAL,
              freq_base: float = 10000.0, freq_scale: float = 1.0, ext_factor: float = 0.0,
              attn_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0,
              n_ctx_orig: int = 0, freq_factors: np.ndarray | None = None, sections=(0, 0, 0, 0),
              n_offs: int = 0, backward: bool = False) -> np.ndarray:
    """Numpy oracle in float64: ``x`` (ne3, ne2, ne1, ne0) rotated by the positions ``pos``
    (``backward``: by the opposite angles, as ROPE_BACK).

    Angles are computed in closed form (``p * base^(-2i/n_dims)``) rather than by repeated
    multiplication; YaRN's correction range uses the same formula as ggml.
    """
    x = np.asarray(x, np.float64)
    n3, n2, n1, n0 = x.shape
    pos = np.asarray(pos, np.int64)
    multi = bool(mode & MODE_MROPE)
    vision = mode == MODE_VISION
    n = n0 if vision else n_dims
    i = np.arange(n // 2, dtype=np.float64)
    ff = np.ones(n // 2) if freq_factors is None else np.asarray(freq_factors, np.float64)[:n // 2]
    # YaRN correction dims
    with np.errstate(all="ignore"):
        def corr(beta):
            return n_dims * np.log(np.float64(n_ctx_orig) / (beta * 2 * np.pi)) / (2 * np.log(freq_base))
        low = max(0.0, float(np.floor(corr(beta_fast))))
        high = min(n_dims - 1.0, float(np.ceil(corr(beta_slow))))
    mscale = attn_factor
    ramp_mix = np.zeros(n // 2)
    if ext_factor != 0.0:
        y = (i - low) / max(0.001, high - low)
        ramp_mix = (1 - np.clip(y, 0, 1)) * ext_factor
        mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    out = x.copy()
    s0, s1, s2, s3 = sections
    sect_dims = max(s0 + s1 + s2 + s3, 1)
    for i2 in range(n2):
        if not multi:
            theta_base = np.full(n // 2, float(pos[i2]))
            expo = i
        else:
            p4 = [float(pos[i2 + k * n2]) for k in range(4)]
            theta_base = np.empty(n // 2)
            expo = np.empty(n // 2)
            for k in range(n // 2):
                sector = k % sect_dims
                w = mrope_section(sector, mode == MODE_IMROPE, s0, s1, s2)
                theta_base[k] = p4[w]
                if vision:
                    start = [0, s0, s0 + s1, s0 + s1 + s2][w]
                    expo[k] = sector - start
                else:
                    expo[k] = k
        extrap = theta_base * float(freq_base) ** (-2.0 * expo / n_dims) / ff
        interp = freq_scale * extrap
        theta = interp * (1 - ramp_mix) + extrap * ramp_mix
        c, s = np.cos(theta) * mscale, np.sin(theta) * mscale * (-1.0 if backward else 1.0)
        row = x[:, i2]
        if vision:
            a, b = np.arange(n // 2), np.arange(n // 2) + n_dims
        elif mode == MODE_NORMAL:
            a = n_offs + 2 * np.arange(n // 2)
            b = a + 1
        else:
            a = n_offs + np.arange(n // 2)
            b = a + n_dims // 2
        x0, x1 = row[..., a], row[..., b]
        out[:, i2][..., a] = x0 * c - x1 * s
        out[:, i2][..., b] = x0 * s + x1 * c
    return out


@kernel("cpu", Op.ROPE, Op.ROPE_BACK)
def bind_rope(node: Node):
    """ROPE (ggml_rope_ext, ggml_rope_multi) in normal, NeoX, MRoPE, IMRoPE and vision modes,
    and ROPE_BACK, which rotates by the opposite angles (ggml negates the sines of the angle
    table, which is exact): the CPU runner of a validated node."""
    a, pos_t = node.src[0], node.src[1]
    ff_t = node.src[2] if len(node.src) > 2 else None
    p = RopeParams(node)
    n0, n2 = a.ne[0], a.ne[2]
    if node.nelements == 0:
        return lambda: None
    params = tuple(node.op_params[1:16].tolist())
    constants = _shared_constants(p, n0, params)    # bound once: fixed by the op's parameters
    backward = node.op == Op.ROPE_BACK
    in_place = False
    if node.type == F32 and a.type == F32:
        x, out = view(a), view(node)
        same = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                and out.strides == x.strides)
        in_place = same or not np.may_share_memory(out, x)

    # The angle table depends only on the positions, the frequency factors and the op's
    # parameters, which every ROPE of a model's layers shares: it is kept on the positions
    # tensor and made again only when its inputs' values differ from the last ones.
    shared_key = ("rope angles", n0, n2, backward, ff_t.id if ff_t is not None else None,
                  params[:14])

    pos = view(pos_t)[0, 0, 0, :]                   # views of fixed bytes: made once
    ff = None if ff_t is None else view(ff_t)[0, 0, 0, :]
    x_f32 = view(a) if a.type == F32 else None
    out_f32 = view(node) if in_place else None
    n_dims, n_offs, mode = p.n_dims, p.n_offs, p.mode

    def run():
        inputs = pos.tobytes() if ff is None else pos.tobytes() + ff.tobytes()
        last = pos_t.views.get(shared_key)
        if last is not None and last[0] == inputs:
            cache = last[1]
        else:
            cache = _angles(p, np.array(pos, dtype=np.int32),
                            None if ff is None else np.array(ff, dtype=np.float32),
                            n0, n2, constants)
            if backward:
                cache[:, 1::2] *= np.float32(-1.0)
            pos_t.views[shared_key] = (inputs, cache)
        x = x_f32 if x_f32 is not None else load_f32(a)
        if in_place:
            rope_rows(x, out_f32, cache, n_dims, n_offs, mode)
        else:
            tmp = np.empty(x.shape, np.float32)
            rope_rows(x, tmp, cache, n_dims, n_offs, mode)
            store_f32(node, tmp)
    return run
