"""llama.cpp's own test-backend-ops, run against refimpl-server through RPC.

Every case of the ops the graph engine implements, for the types it implements, must pass
(spec/graph-ops.md).  CI runs a bounded subset of the required cases (:func:`bounded`: a few
cases of every combination of types and options, shapes varied only where they choose a
different kernel); the full catalogue, including the cases refimpl refuses, is measured by
``python -m tools.backend_ops`` and reported in docs/backend-ops.md, and
``REFIMPL_BACKEND_OPS=all pytest tests/e2e/test_backend_ops.py`` runs every required case.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
import pytest

from refimpl.kernels.tiles import TILED_FROM_TOKENS
from tools.backend_ops import list_cases, run_cases
from tools.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

WEIGHTS = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_K", "q6_K"}
FLOAT = {"f32", "f16", "bf16"}
#: the types of a quantised KV cache (-ctk/-ctv): SET_ROWS and CPY into them, attention over them
KV_QUANT = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}
#: the formats of refimpl.kernels.quants_more (issue 13 item 3)
NEW_WEIGHTS = {"iq4_nl", "iq4_xs", "mxfp4", "nvfp4", "tq1_0", "tq2_0", "q1_0", "q2_0"}
#: the codebook formats of refimpl.kernels.quants_grid (read only: ggml's CPU backend cannot
#: quantise into them, so CPY and SET_ROWS into them are not supported there either)
GRID_WEIGHTS = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"}
ALL_WEIGHTS = WEIGHTS | NEW_WEIGHTS | GRID_WEIGHTS
#: the k-quants, which SET_ROWS and CPY quantise into (refimpl.kernels.quantize_k)
K_QUANTS = {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K"}
MUL_MAT_ID_WEIGHTS = ALL_WEIGHTS | {"q2_K", "q3_K", "q5_K"}


def _param(case: str, name: str) -> str | None:
    m = re.search(rf"[(,]{name}=([^,)]+)", case)
    return m.group(1) if m else None


def required(case: str) -> bool:
    """Whether refimpl must pass this case (the ops and types of the graph-engine issue, and
    a sample of the weight types of issue 13)."""
    op = case.split("(", 1)[0]
    if op == "MUL_MAT":  # activations (src1) as llama.cpp sends them: F32
        return _param(case, "type_a") in ALL_WEIGHTS and _param(case, "type_b") == "f32"
    if op == "GET_ROWS":
        return _param(case, "type") in ALL_WEIGHTS | {"i32"}
    if op == "FLASH_ATTN_EXT":
        return _param(case, "type_K") in FLOAT | KV_QUANT and _param(case, "type_V") in FLOAT | KV_QUANT
    if op == "SET_ROWS":
        return _param(case, "type_dst") in FLOAT | KV_QUANT | K_QUANTS
    if op == "MUL_MAT_ID":  # every MUL_MAT weight type; experts of at most 4 Mi weights
        size = 1
        for name in ("n_mats", "m", "k"):
            size *= int(_param(case, name) or 0)
        return (_param(case, "type_a") in MUL_MAT_ID_WEIGHTS and _param(case, "type_b") == "f32"
                and size <= 1 << 22)
    if op == "OUT_PROD":  # what ggml's CPU backend runs: F32 src1, block formats unbroadcast
        a = _param(case, "type_a")
        return (a in ALL_WEIGHTS - {"bf16"} and _param(case, "type_b") == "f32"
                and (a == "f32" or "nr=[1,1]" in case))
    if op == "GET_ROWS_BACK":
        return _param(case, "type") in {"f32", "f16"}
    if op == "SOFT_MAX_BACK":  # ggml's CPU backend has no ALiBi backward
        return float(_param(case, "max_bias")) == 0.0
    if op == "CPY":
        src, dst = _param(case, "type_src"), _param(case, "type_dst")
        return ((src == dst and src in ALL_WEIGHTS) or (src in FLOAT and dst in FLOAT)
                or (src in FLOAT and dst in KV_QUANT | NEW_WEIGHTS | K_QUANTS)
                or (src in ALL_WEIGHTS and dst == "f32"))
    return True


#: Parameters that only size a case; :func:`bounded` varies them no further than the kernels
#: do (below).
_SIZES = {"hsk", "hsv", "nh", "nr23", "kv", "nb", "ne", "ne_src", "n", "m", "k", "r", "bs", "nr",
          "be1", "be2", "offset_cols", "n_kv_max"}


#: The image ops (issue 14): parameters that only size their cases (tensor shapes, channel
#: and batch counts, the kernel window); their strides, paddings, dilations, modes and
#: layouts stay options.
_IMAGE_OPS = {"REPEAT", "REPEAT_BACK", "CONCAT", "PAD", "PAD_REFLECT_1D", "ROLL", "UPSCALE",
              "IM2COL", "IM2COL_3D", "COL2IM_1D", "CONV_TRANSPOSE_1D", "CONV_2D", "CONV_3D",
              "CONV_2D_DW", "CONV_TRANSPOSE_2D", "POOL_1D", "POOL_2D", "CONV_1D_DW"}
_IMAGE_SIZES = {"ne_input", "ne_kernel", "ne_a", "ne_tgt", "ne_b_d", "N", "IC", "ID", "IH", "IW",
                "OC", "KD", "KH", "KW", "K", "T_in", "scale_factor", "k0", "k1", "kernel_offset",
                "pad_0", "pad_1", "lp0", "rp0", "lp1", "rp1", "lp2", "rp2", "lp3", "rp3"}

#: The recurrent family's ops: the parameters that choose a different path of its kernels (the
#: rest only size a case).  Size classes: SSM_SCAN's head_dim 1 (Mamba-1's per-state decay) or
#: more, SSM_CONV's d_conv; LIGHTNING_INDEXER's keys count as F32, F16/BF16 or a block type
#: (one conversion path each; every weight type's rows are tested by GET_ROWS).
_RECURRENT_OPTIONS = {
    "SSM_CONV": (), "SSM_SCAN": ("xbc_overlap", "K", "weak_decay"),
    "RWKV_WKV6": ("n_seqs",), "GATED_LINEAR_ATTN": ("n_seqs",), "RWKV_WKV7": ("n_seqs",),
    "GATED_DELTA_NET": ("v_repeat", "permuted", "kda", "K"), "SOLVE_TRI": (),
    "LIGHTNING_INDEXER": ("ns", "nm"), "DSV4_HC_COMB": ("n_iter",), "DSV4_HC_PRE": ("gated",),
    "DSV4_HC_POST": ("identity", "gated"),
}


def _features(case: str) -> list[tuple]:
    """What a case exercises: its op with its combination of types and the size class that
    picks a refimpl kernel (rows per product for MUL_MAT; rows per head, split decode, head
    sizes and grouped heads for FLASH_ATTN_EXT; broadcast and batches for OUT_PROD), and each
    of its options on its own."""
    op = case.split("(", 1)[0]
    p = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,)]+)", case[len(op):]))
    types = tuple(sorted((k, v) for k, v in p.items() if k.startswith("type")))
    size: tuple = ()
    if op == "MUL_MAT":
        n = int(p["n"])
        # one-token, two-row, four-row kernels; prompts' tiles from TILED_FROM_TOKENS
        size = (1 if n == 1 else 2 if n < 4 else 4 if n < TILED_FROM_TOKENS else TILED_FROM_TOKENS,
                p["bs"] != "[1,1]" or p["nr"] != "[1,1]",
                int(p["k"]) % 256 == 0)
    if op == "OUT_PROD":  # broadcast batches (F32 src0 only) and batched products
        size = (p["nr"] != "[1,1]", p["bs"] != "[1,1]")
    if op == "FLASH_ATTN_EXT":
        nb = int(p["nb"])
        size = (1 if nb == 1 else 2 if nb < 64 else 64, int(p["kv"]) >= 512,
                p["hsk"] != p["hsv"], int(p["hsk"]) % 16 == 0, p["nr23"] != "[1,1]")
    if op in _RECURRENT_OPTIONS:
        size = ((p.get("head_dim") == "1",) if op == "SSM_SCAN" else
                (p["ne_b"].strip("[]").split(",")[0],) if op == "SSM_CONV" else ())
        if op == "LIGHTNING_INDEXER":
            k = p["type_K"]
            types = (("type_K", k if k in ("f32", "f16", "bf16") else "block"),)
        return [(op, types, size)] + [(op, k, v) for k, v in p.items()
                                      if k in _RECURRENT_OPTIONS[op]]
    sizes = _SIZES | _IMAGE_SIZES if op in _IMAGE_OPS else _SIZES
    if op in _IMAGE_OPS:   # the input's type names the combination (kernel type or dst type)
        types = tuple(sorted((k, v) for k, v in p.items() if k.startswith(("type", "kernel_type",
                                                                           "dst_type"))))
    options = [(op, k, v) for k, v in p.items() if k not in sizes and not k.startswith("type")
               and not (op in _IMAGE_OPS and k in ("kernel_type", "dst_type"))]
    return [(op, types, size)] + options


def _case_size(case: str) -> int:
    """The elements of a case's shapes (the products of its ``[..]`` parameters), summed."""
    return sum(int(np.prod([int(x) for x in dims.split(",")]))
               for dims in re.findall(r"\[([0-9,]+)\]", case))


def bounded(cases: list[str], per_feature: int = 1) -> list[str]:
    """A subset that still covers every combination of types (with each kernel-choosing size
    class) and every option value ``per_feature`` times: cases in catalogue order, each kept
    when it brings a feature (:func:`_features`) seen fewer times.  All of them with
    ``REFIMPL_BACKEND_OPS=all``."""
    if os.environ.get("REFIMPL_BACKEND_OPS") == "all":
        return cases
    seen: collections.Counter = collections.Counter()
    out = []
    for c in cases:
        features = _features(c)
        if any(seen[f] < per_feature for f in features):
            seen.update(features)
            out.append(c)
    return out


OPS = {
    "elementwise": "ADD,MUL,SCALE,SILU,GELU,SWIGLU,GEGLU,RMS_NORM",
    "layout": "CONT,CPY,DUP",
    "rows": "GET_ROWS,SET_ROWS",
    "attention": "SOFT_MAX,ROPE",
    "flash_attn": "FLASH_ATTN_EXT",
    "mul_mat": "MUL_MAT",
    "moe": "SUM_ROWS,CLAMP,FILL,ARGSORT,TOP_K,ADD_ID,MUL_MAT_ID",
    "image": ",".join(sorted(_IMAGE_OPS)),
    "training": "SILU_BACK,RMS_NORM_BACK,OUT_PROD,GET_ROWS_BACK,SOFT_MAX_BACK,ROPE_BACK,"
                "CROSS_ENTROPY_LOSS,CROSS_ENTROPY_LOSS_BACK,OPT_STEP_ADAMW,OPT_STEP_SGD",
    # issue 14, elementwise and reductions: the ops of spec/ops/elementwise.md and, through
    # the same UNARY/GLU kernels as the "elementwise" group, the sub-ops with code of their own
    # (XIELU's parameters, GELU_QUICK's table, SOFTPLUS's cut-off, ROUND, SWIGLU_OAI's clamps,
    # GEGLU_QUICK); every sub-op passes in docs/backend-ops.md and tests/kernels/test_unary.py
    "math_reduce": "SQR,SQRT,LOG,SIN,COS,LEAKY_RELU,ACC,SET,TRI,DIAG,DIAG_MASK_INF,ARANGE,"
                   "TIMESTEP_EMBEDDING,SUM,MEAN,CUMSUM,ARGMAX,COUNT_EQUAL,L2_NORM,GROUP_NORM,"
                   "XIELU,GELU_QUICK,SOFTPLUS,ROUND,SWIGLU_OAI,GEGLU_QUICK",
    # RWKV_WKV7's and GATED_DELTA_NET's cases L2-normalise their inputs in the graph (L2_NORM,
    # spec/ops/elementwise.md); DSV4_HC_POST's gated cases pass post through SCALE and SIGMOID
    "recurrent": "SSM_CONV,SSM_SCAN,RWKV_WKV6,GATED_LINEAR_ATTN,RWKV_WKV7,GATED_DELTA_NET,"
                 "SOLVE_TRI,LIGHTNING_INDEXER,DSV4_HC_COMB,DSV4_HC_PRE,DSV4_HC_POST",
}

@pytest.mark.parametrize("group", list(OPS))
def test_required_cases_pass(peer_bin, group):
    # cases ggml's CPU backend cannot run (CONV_2D of channel-first kernels it does not see as
    # contiguous, same-type copies of the codebook formats, ...) have nothing to compare with,
    # so they are never required
    listed = list_cases(peer_bin, OPS[group], supported_only=True)
    if group == "image":   # smallest first, so that small cases bring each feature, once
        listed.sort(key=_case_size)
    cases = bounded([c for c in listed if required(c)])
    assert cases
    with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
        report = run_cases(peer_bin, srv.endpoint, cases)
        assert srv.alive()
    bad = {c: r for c, r in report.results.items() if r != "ok"}
    assert not bad, f"{len(bad)} of {len(cases)} required cases did not pass: " + \
        "\n".join(f"{r}: {c}" for c, r in list(bad.items())[:30])
