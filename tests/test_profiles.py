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
    used = {p.op_table for p in PROFILES.values() if p.op_table}
    used |= {k for p in PROFILES.values() for k in p.op_table_choices}
    assert set(op_tables()) == used


def test_op_tables_of_unpinned_versions():
    # 3.0.0 and 3.6.0 builds numbered ops in several ways (spec/versions.md, "Before 3.6.1"):
    # each choice is that version's, named by its op count, and the default is one of them.
    for name, counts in (("3.0.0", [90, 94, 95]), ("3.6.0", [95, 96])):
        p = profile(name)
        assert [len(op_tables()[k]["ops"]) for k in p.op_table_choices] == counts
        assert [k.rsplit("-", 1)[1] for k in p.op_table_choices] == [str(c) for c in counts]
        assert p.op_table in p.op_table_choices
        assert p.with_op_table(p.op_table_choices[-1]).op_count == counts[-1]
        with pytest.raises(ValueError):
            p.with_op_table("4.0.0")
    with pytest.raises(ValueError, match="only 4.0.0"):
        profile("4.0.0").with_op_table("3.6.1")
    # refimpl-server --op-count N
    assert profile("3.0.0").with_op_count(94).op_table == "3.0.0-94"
    assert profile("4.0.0").with_op_count(96) is profile("4.0.0")
    with pytest.raises(ValueError, match="had 90, 94, 95"):
        profile("3.0.0").with_op_count(93)
    with pytest.raises(ValueError, match="fixes the op count at 96"):
        profile("4.0.0").with_op_count(93)
    # The history tables agree with the release ones where they meet: 3.6.0's last table is
    # 3.6.1's (the bump to 3.6.1 only declared it), 3.5.0's is 3.0.0's last and 3.6.0's first,
    # and 4.0.3 / 5.1.0 number ops as 5.0.0 does.
    t = op_tables()
    for a, b in (("3.6.0-96", "3.6.1"), ("3.5.0", "3.0.0-95"), ("3.5.0", "3.6.0-95"),
                 ("4.0.3", "5.0.0"), ("5.1.0", "5.0.0")):
        assert dict(t[a]["ops"]) == dict(t[b]["ops"]), (a, b)
    assert [k for k in t["3.6.0-96"]["ops"] if k not in t["3.6.0-95"]["ops"]] == ["GATED_DELTA_NET"]


def test_profile_lookup():
    assert profile((4, 0, 1)).name == "4.0.1"
    with pytest.raises(KeyError, match="supported: 3.0.0"):
        profile("2.0.0")
