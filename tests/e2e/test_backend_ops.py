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
MUL_MAT_ID_WEIGHTS = WEIGHTS | {"q2_K", "q3_K", "q5_K"}


def _param(case: str, name: str) -> str | None:
    m = re.search(rf"[(,]{name}=([^,)]+)", case)
    return m.group(1) if m else None


def required(case: str) -> bool:
    """Whether refimpl must pass this case (the ops and types of the graph-engine issue)."""
    op = case.split("(", 1)[0]
    if op == "MUL_MAT":  # activations (src1) as llama.cpp sends them: F32
        return _param(case, "type_a") in WEIGHTS and _param(case, "type_b") == "f32"
    if op == "GET_ROWS":
        return _param(case, "type") in WEIGHTS | {"i32"}
    if op == "FLASH_ATTN_EXT":
        return _param(case, "type_K") in FLOAT and _param(case, "type_V") in FLOAT
    if op == "SET_ROWS":
        return _param(case, "type") in FLOAT
    if op == "MUL_MAT_ID":  # every MUL_MAT weight type; experts of at most 4 Mi weights
        size = 1
        for name in ("n_mats", "m", "k"):
            size *= int(_param(case, name) or 0)
        return (_param(case, "type_a") in MUL_MAT_ID_WEIGHTS and _param(case, "type_b") == "f32"
                and size <= 1 << 22)
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
    "moe": "SUM_ROWS,CLAMP,FILL,ARGSORT,TOP_K,ADD_ID,MUL_MAT_ID",
}

#: Groups run as a sample: at most this many cases per op and type, spread over the catalogue
#: (the full catalogue is measured by tools.backend_ops, docs/backend-ops.md).
SAMPLED = {"moe": 6}


def _sample(cases: list[str], per_key: int) -> list[str]:
    """At most ``per_key`` cases of each (op, first type parameter), evenly spaced."""
    groups: dict = {}
    for c in cases:
        m = re.search(r"\(type(?:_a)?=([^,)]+)", c)
        groups.setdefault((c.split("(", 1)[0], m.group(1) if m else ""), []).append(c)
    out = []
    for items in groups.values():
        step = max(1, -(-len(items) // per_key))
        out += items[::step]
    return out


@pytest.mark.parametrize("group", list(OPS))
def test_required_cases_pass(peer_bin, group):
    cases = [c for c in list_cases(peer_bin, OPS[group]) if required(c)]
    if group in SAMPLED:
        cases = _sample(cases, SAMPLED[group])
    assert cases
    with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
        report = run_cases(peer_bin, srv.endpoint, cases)
        assert srv.alive()
    bad = {c: r for c, r in report.results.items() if r != "ok"}
    assert not bad, f"{len(bad)} of {len(cases)} required cases did not pass: " + \
        "\n".join(f"{r}: {c}" for c, r in list(bad.items())[:30])
