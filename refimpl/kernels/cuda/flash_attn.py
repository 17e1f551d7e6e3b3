"""FLASH_ATTN_EXT on CUDA (spec/ops/flash_attn.md): one block per query row, keys taken in
tiles of one key per thread with an online softmax.

For each tile every thread scores one key (``scale·q·k``, soft-capped, plus ``slope·mask``)
into shared memory; the tile's maximum updates the running maximum ``M`` (the accumulator and
the sum are rescaled by ``exp(M_old - M)``), the weights ``exp(s - M)`` replace the scores, and
the threads then split the value dimension, adding the tile's weighted V rows to the
accumulator (shared, up to :data:`MAX_DV` values).  The sink joins after the last tile.  K and
V may be F32, F16 (native) or BF16, of different types; the mask is F16.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...graph.ops import Op
from ...graph.registry import kernel
from ...protocol.ggml_types import GgmlType
from ..softmax import alibi_slopes
from ._common import (SMEM, is_bf16, launch_rows, ld, lo, overlaps, runner, tables, targ,
                      unravel)

_FLOAT_KV = {GgmlType.F32, GgmlType.F16, GgmlType.BF16}

#: Largest V head size served (the accumulator lives in shared memory).
MAX_DV = 1024


@cuda.jit
def fa_kernel(DK, DV, nq1, nq2, nq3, nkv, gk, gv, q, qo, qs0, qs1, qs2, qs3,
              k, ko, ks0, ks1, ks2, ks3, kbf, v, vo, vs0, vs1, vs2, vs3, vbf,
              use_mask, m, mo, ms0, ms1, ms2, ms3, mn2, mn3, use_sinks, sk, sko, sks0,
              slopes, scale, softcap, d, do, ds0, ds1, ds2, ds3, bft):
    sc = cuda.shared.array(SMEM, np.float32)
    acc = cuda.shared.array(MAX_DV, np.float32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    ninf = np.float32(-math.inf)
    items = nq1 * nq2 * nq3
    for it in range(cuda.blockIdx.x, items, cuda.gridDim.x):
        iq1, h, i3, _ = unravel(it, nq1, nq2, nq3)
        qb = qo + iq1 * qs1 + h * qs2 + i3 * qs3
        kb = ko + (h // gk) * ks2 + i3 * ks3
        vb = vo + (h // gv) * vs2 + i3 * vs3
        mb = mo + iq1 * ms1 + (h % mn2) * ms2 + (i3 % mn3) * ms3
        slope = slopes[h]
        big = ninf
        total = np.float32(0.0)
        for e in range(tid, DV, nt):
            acc[e] = 0.0
        cuda.syncthreads()
        for base in range(0, nkv, nt):
            j = base + tid
            s = ninf
            if j < nkv:
                dot = np.float32(0.0)
                for e in range(DK):
                    dot += q[qb + e * qs0] * ld(k, kb + j * ks1 + e * ks0, kbf, bft)
                s = dot * scale
                if softcap != 0:
                    s = softcap * np.float32(math.tanh(s / softcap))
                if use_mask:
                    s = s + slope * ld(m, mb + j * ms0, False, bft)
            sc[tid] = s
            cuda.syncthreads()
            tmax = ninf
            for u in range(nt):
                w = sc[u]
                tmax = w if w > tmax else tmax
            new = tmax if tmax > big else big
            cuda.syncthreads()
            corr = np.float32(1.0)
            p = np.float32(0.0)
            if new != ninf:
                if s != ninf:
                    p = np.float32(math.exp(s - new))
                if big != ninf:
                    corr = np.float32(math.exp(big - new))
                else:
                    corr = np.float32(0.0)
            sc[tid] = p
            cuda.syncthreads()
            tsum = np.float32(0.0)
            for u in range(nt):
                tsum += sc[u]
            total = total * corr + tsum
            last = lo(nt, nkv - base)
            for e in range(tid, DV, nt):
                a = acc[e] * corr
                for u in range(last):
                    a += sc[u] * ld(v, vb + (base + u) * vs1 + e * vs0, vbf, bft)
                acc[e] = a
            big = new
            cuda.syncthreads()
        corr = np.float32(1.0)
        if use_sinks:
            sink = sk[sko + h * sks0]
            new = sink if sink > big else big
            corr = np.float32(math.exp(big - new)) if big != ninf else np.float32(0.0)
            total = total * corr + np.float32(math.exp(sink - new))
        db = do + h * ds1 + iq1 * ds2 + i3 * ds3
        for e in range(tid, DV, nt):
            d[db + e * ds0] = acc[e] * corr / total if total > 0 else np.float32(0.0)
        cuda.syncthreads()


@kernel("cuda", Op.FLASH_ATTN_EXT)
def bind(node):
    q_t, k_t, v_t = node.src[0], node.src[1], node.src[2]
    mask_t = node.src[3] if len(node.src) > 3 else None
    sinks_t = node.src[4] if len(node.src) > 4 else None
    dk, dv, nkv = k_t.ne[0], v_t.ne[0], k_t.ne[1]
    if dv > MAX_DV or not {k_t.type, v_t.type} <= _FLOAT_KV:   # quantised caches: CPU only
        return None
    nq1, nq2, nq3 = q_t.ne[1], q_t.ne[2], q_t.ne[3]
    scale = np.float32(node.param_f32(0))
    softcap = np.float32(node.param_f32(2))
    slopes_host = alibi_slopes(nq2, node.param_f32(1))

    def run():
        if node.nelements == 0:
            return
        _, bft = tables(node.buffer.memory.device)
        slopes = cuda.to_device(np.ascontiguousarray(slopes_host, np.float32))
        tq = targ(q_t, snapshot=overlaps(node, q_t))
        tk = targ(k_t, snapshot=overlaps(node, k_t))
        tv = targ(v_t, snapshot=overlaps(node, v_t))
        if mask_t is not None:
            tm = targ(mask_t, snapshot=overlaps(node, mask_t))
            mn = (mask_t.ne[2], mask_t.ne[3])
        else:
            tm, mn = targ(q_t, np.float16), (1, 1)
        ts = targ(sinks_t, snapshot=overlaps(node, sinks_t))[:3] if sinks_t is not None else tq[:3]
        blocks, threads = launch_rows(nq1 * nq2 * nq3)
        fa_kernel[blocks, threads](dk, dv, nq1, nq2, nq3, nkv, nq2 // k_t.ne[2], nq2 // v_t.ne[2],
                                   *tq, *tk, is_bf16(k_t), *tv, is_bf16(v_t),
                                   mask_t is not None, *tm, *mn, sinks_t is not None, *ts,
                                   slopes, scale, softcap, *targ(node), bft)
    return runner(node, run)
