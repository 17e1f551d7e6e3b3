"""ROPE on CUDA (spec/ops/rope.md): normal, NeoX, MRoPE, IMRoPE and vision modes, YaRN and
frequency factors.

One thread per rotated pair (it reads both elements before writing either, so the node may
rotate in place) and one per element outside the rotated window (copied).  The angle of pair
``k`` is computed directly as ``p · base^(-2k/n_dims)`` in float32 on the GPU, where ggml's CPU
backend multiplies its way up pair by pair: the two differ by float rounding of the angle.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ..rope import (MODE_IMROPE, MODE_NORMAL, MODE_VISION, RopeParams, mrope_section,
                    yarn_corr_dims)
from ._common import (device, hi, is_bf16, launch, ld, lo, reads_safely, runner, st,
                      tables, targ, unravel)

_section = device(mrope_section)


@device
def _angle(k, i2, n2, pos, po, ps, multi, mode, s0, s1, s2, s3):
    """(position, exponent) of pair ``k`` of token ``i2``."""
    if not multi:
        return np.float32(pos[po + i2 * ps]), k
    sect = s0 + s1 + s2 + s3
    sector = k % sect
    w = _section(sector, mode == MODE_IMROPE, s0, s1, s2)
    expo = k
    if mode == MODE_VISION:
        start = 0
        if w == 1:
            start = s0
        elif w == 2:
            start = s0 + s1
        elif w == 3:
            start = s0 + s1 + s2
        expo = sector - start
    return np.float32(pos[po + (i2 + w * n2) * ps]), expo


@cuda.jit
def rope_kernel(n0, n1, n2, n3, x, xo, xs0, xs1, xs2, xs3, bf, d, do, ds0, ds1, ds2, ds3, bft,
                pos, po, ps, ff, fo, fs, use_ff, mode, multi, s0, s1, s2, s3, n_dims, n_offs, npairs,
                freq_base, freq_scale, ext_factor, attn_factor, low, high):
    npass = n0 - 2 * npairs
    per_row = npairs + npass
    n = per_row * n1 * n2 * n3
    one = np.float32(1.0)
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        k, i1, i2, i3 = unravel(i, per_row, n1, n2)
        xb = xo + i1 * xs1 + i2 * xs2 + i3 * xs3
        db = do + i1 * ds1 + i2 * ds2 + i3 * ds3
        if k >= npairs:                          # outside the rotated window: copied
            p = k - npairs
            e = p if p < n_offs else p + n_dims
            st(d, db + e * ds0, ld(x, xb + e * xs0, bf, bft), bf)
            continue
        base, expo = _angle(k, i2, n2, pos, po, ps, multi, mode, s0, s1, s2, s3)
        extrap = base * np.float32(math.pow(freq_base, np.float32(-2.0) * np.float32(expo)
                                            / np.float32(n_dims)))
        if use_ff:
            extrap = extrap / ff[fo + k * fs]
        interp = freq_scale * extrap
        theta = interp
        mscale = attn_factor
        if ext_factor != 0:
            y = (np.float32(k) - low) / hi(np.float32(0.001), high - low)
            ramp_mix = (one - lo(one, hi(np.float32(0.0), y))) * ext_factor
            theta = interp * (one - ramp_mix) + extrap * ramp_mix
            mscale = mscale * (one + np.float32(0.1) * np.float32(math.log(one / freq_scale)))
        c = np.float32(math.cos(theta)) * mscale
        s = np.float32(math.sin(theta)) * mscale
        if mode == MODE_VISION:
            ea = k
            eb = k + n_dims
        elif mode == MODE_NORMAL:
            ea = n_offs + 2 * k
            eb = ea + 1
        else:
            ea = n_offs + k
            eb = ea + n_dims // 2
        x0 = ld(x, xb + ea * xs0, bf, bft)
        x1 = ld(x, xb + eb * xs0, bf, bft)
        st(d, db + ea * ds0, x0 * c - x1 * s, bf)
        st(d, db + eb * ds0, x0 * s + x1 * c, bf)


@kernel("cuda", Op.ROPE)
def bind(node):
    a, pos_t = node.src[0], node.src[1]
    ff_t = node.src[2] if len(node.src) > 2 else None
    p = RopeParams(node)
    n0 = a.ne[0]
    npairs = (n0 if p.mode == MODE_VISION else p.n_dims) // 2
    low, high = yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow)
    f32 = np.float32

    def run():
        if node.nelements == 0:
            return
        _, bft = tables(node.buffer.memory.device)
        tx = targ(a, snapshot=not reads_safely(node, a))
        tp = targ(pos_t)[:3]
        tf = targ(ff_t)[:3] if ff_t is not None else (tx[0], 0, 0)
        rows = node.ne[1] * node.ne[2] * node.ne[3]
        blocks, threads = launch(rows * (n0 - npairs))
        rope_kernel[blocks, threads](*node.ne, *tx, is_bf16(node), *targ(node), bft, *tp, *tf,
                                     ff_t is not None, p.mode, p.multi, *p.sections, p.n_dims,
                                     p.n_offs, npairs, f32(p.freq_base), f32(p.freq_scale),
                                     f32(p.ext_factor), f32(p.attn_factor), f32(low), f32(high))
    return runner(node, run)
