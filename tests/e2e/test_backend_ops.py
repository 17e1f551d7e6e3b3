"""llama.cpp's own test-backend-ops, run against refimpl-server through RPC.

Every case of the ops the graph engine implements, for the types it implements, must pass
(spec/graph-ops.md).  The cases listed below as required are run here; the full catalogue,
including the cases refimpl refuses, is measured by ``python -m tools.backend_ops``
and reported in docs/backend-ops.md.
"""

from __future__ import annotations

import re

import pytest

from tools.backend_ops import list_cases, run_cases
from tools.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

WEIGHTS = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_K", "q6_K"}
FLOAT = {"f32", "f16", "bf16"}
#: The formats of refimpl.kernels.quants_more, run on a bounded sample (:func:`_sampled`);
#: their full catalogue is measured by tools.backend_ops (docs/backend-ops.md).
NEW_WEIGHTS = {"iq4_nl", "iq4_xs", "mxfp4", "nvfp4", "tq1_0", "tq2_0", "q1_0", "q2_0"}


def _param(case: str, name: str) -> str | None:
    m = re.search(rf"[(,]{name}=([^,)]+)", case)
    return m.group(1) if m else None


def _sampled(op: str, case: str) -> bool:
    """The few cases per new weight type CI runs: MUL_MAT with one and eight activation
    rows (both kernels) plus the broadcast batches, GET_ROWS from contiguous sources, and
    unpermuted same-type copies and every copy to F32."""
    if op == "MUL_MAT":
        return (_param(case, "type_b") == "f32" and _param(case, "n") in {"1", "8"}
                and ("bs=[1,1],nr=[1,1],per=[0,1,2,3]" in case or "bs=[3,2],nr=[2,2]" in case))
    if op == "GET_ROWS":
        return _param(case, "vs0") == "0"
    return "permute_src=[0,0,0,0]" in case or _param(case, "type_dst") == "f32"


def required(case: str) -> bool:
    """Whether refimpl must pass this case (the ops and types of the graph-engine issue, and
    a sample of the weight types of issue 13)."""
    op = case.split("(", 1)[0]
    if op in ("MUL_MAT", "GET_ROWS", "CPY"):
        new = {_param(case, p) for p in ("type_a", "type", "type_src")} & NEW_WEIGHTS
        if new and (op != "CPY" or _param(case, "type_dst") in new | {"f32"}):
            return _sampled(op, case)
    if op == "MUL_MAT":  # activations (src1) as llama.cpp sends them: F32
        return _param(case, "type_a") in WEIGHTS and _param(case, "type_b") == "f32"
    if op == "GET_ROWS":
        return _param(case, "type") in WEIGHTS | {"i32"}
    if op == "FLASH_ATTN_EXT":
        return _param(case, "type_K") in FLOAT and _param(case, "type_V") in FLOAT
    if op == "SET_ROWS":
        return _param(case, "type") in FLOAT
    if op == "CPY":
        src, dst = _param(case, "type_src"), _param(case, "type_dst")
        return (src == dst and src in WEIGHTS) or (src in FLOAT and dst in FLOAT)
    return True


OPS = {
    "elementwise": "ADD,MUL,SCALE,SILU,GELU,SWIGLU,GEGLU,RMS_NORM",
    "layout": "CONT,CPY,DUP",
    "rows": "GET_ROWS,SET_ROWS",
    "attention": "SOFT_MAX,ROPE",
    "flash_attn": "FLASH_ATTN_EXT",
    "mul_mat": "MUL_MAT",
}


@pytest.mark.parametrize("group", list(OPS))
def test_required_cases_pass(peer_bin, group):
    cases = [c for c in list_cases(peer_bin, OPS[group]) if required(c)]
    assert cases
    with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
        report = run_cases(peer_bin, srv.endpoint, cases)
        assert srv.alive()
    bad = {c: r for c, r in report.results.items() if r != "ok"}
    assert not bad, f"{len(bad)} of {len(cases)} required cases did not pass: " + \
        "\n".join(f"{r}: {c}" for c, r in list(bad.items())[:30])
