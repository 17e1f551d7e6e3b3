"""Protocol profiles (refimpl/protocol/profiles.py): the 7.0.0 profile is exactly what the code
speaks today, and every profile is internally consistent.  No peer needed."""

from __future__ import annotations

import pytest

from refimpl.graph.ops import OP_COUNT, GluOp, Op, UnaryOp
from refimpl.protocol import messages as m
from refimpl.protocol.constants import COMMAND_LIMIT, PROTOCOL_VERSION, Command
from refimpl.protocol.profiles import LATEST, PROFILES, op_tables, profile
from refimpl.protocol.tensor import RPC_TENSOR


def test_latest_profile_is_what_the_code_speaks():
    p = profile("7.0.0")
    assert p is LATEST and p.version == PROTOCOL_VERSION
    assert dict(p.commands) == {c.name: int(c) for c in Command}
    assert p.command_limit == COMMAND_LIMIT
    assert p.hello_request_size == m.HelloRequest.payload_size()
    assert p.hello_response_size == m.HelloResponse.payload_size()
    assert p.set_tensor_header_size == m.SET_TENSOR_HEADER_SIZE
    assert p.get_alloc_size_request_size == m.GetAllocSizeRequest.payload_size()
    assert p.rpc_tensor_tail == RPC_TENSOR.fields[-1].name
    assert p.no_reply == {c.name for c in Command if not m.has_response(c)}
    assert p.empty_reply == {c.name for c, r in m.RESPONSES.items()
                             if r is not m.GetTensorResponse and r.payload_size() == 0}


def test_latest_op_tables_are_the_graph_engines():
    assert dict(LATEST.ops) == {o.name: int(o) for o in Op} and len(LATEST.ops) == OP_COUNT
    assert dict(LATEST.unary_ops) == {o.name: int(o) for o in UnaryOp}
    assert dict(LATEST.glu_ops) == {o.name: int(o) for o in GluOp}


@pytest.mark.parametrize("p", PROFILES.values(), ids=lambda p: p.name)
def test_profile_is_consistent(p):
    assert sorted(p.commands.values()) == list(range(p.command_limit))
    assert p.commands["HELLO"] == 14
    assert p.no_reply <= set(p.commands) and p.empty_reply <= set(p.commands)
    assert not p.no_reply & p.empty_reply
    assert "SET_TENSOR" in p.no_reply
    assert (p.hello_request_size, p.hello_response_size) == ((0, 3) if p.version < (4, 0, 0) else (24, 28))
    assert p.rpc_tensor_tail in ("padding", "use_count")
    assert p.source in ("release", "ggml", "inferred")
    assert bool(p.releases) == (p.source == "release")
    if p.version >= (3, 6, 1):
        assert p.op_table is not None
    if p.op_table is not None:
        for kind in ("ops", "unary", "glu"):
            table = op_tables()[p.op_table][kind]
            assert sorted(table.values()) == list(range(len(table)))


def test_profiles_are_ordered_and_releases_do_not_overlap():
    versions = list(PROFILES)
    assert versions == sorted(versions) and versions[0] == (3, 0, 0) and versions[-1] == PROTOCOL_VERSION
    releases = [r for p in PROFILES.values() for r in p.releases]
    assert len(releases) == len(set(releases))
    minors = [int(r.rsplit(".", 1)[1]) for r in releases]
    assert minors == list(range(17, 37)), "0.3.17 … 0.3.36, in version order, without gaps"


def test_every_op_table_is_used():
    assert set(op_tables()) == {p.op_table for p in PROFILES.values() if p.op_table}


def test_profile_lookup():
    assert profile((4, 0, 1)).name == "4.0.1"
    with pytest.raises(KeyError, match="supported: 3.0.0"):
        profile("2.0.0")
