"""Op tables and protocol profiles against the real sources of every mapped release.

Reads the ``llama-cpp-python`` sdists cached in ``~/.cache/refimpl-peers/sdists`` (downloaded
from PyPI on first use).  Sources that cannot be had FAIL these tests: they never skip.
"""

from __future__ import annotations

import pytest

from refimpl.protocol.profiles import PROFILES, op_tables
from tools import op_tables as ot
from tools.peers import PeerUnavailable

pytestmark = pytest.mark.peer


def release_info(release):
    try:
        return ot.read_release(release)
    except PeerUnavailable as exc:
        pytest.fail(f"sources of llama-cpp-python {release} unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def tables():
    try:
        return ot.build_tables()
    except PeerUnavailable as exc:
        pytest.fail(f"llama-cpp-python sources unavailable: {exc}", pytrace=False)


def test_op_tables_json_matches_the_headers(tables):
    assert ot.load_tables() == tables, "run python -m tools.op_tables"
    assert ot.JSON_PATH.read_text() == ot.render_json(tables)


def test_op_tables_spec_page_is_current(tables):
    assert ot.SPEC_PATH.read_text() == ot.render_markdown(tables), "run python -m tools.op_tables"


@pytest.mark.parametrize("release", ot.RELEASES)
def test_release_speaks_its_mapped_version(release):
    info = release_info(release)
    assert info["protocol"] == ot.RELEASES[release]
    if info["asserted_op_count"] is not None:
        assert info["asserted_op_count"] == len(info["ops"])
    else:
        assert info["protocol"] is None or info["protocol"] < ot.FIRST_PINNED
    if info["protocol"] is None:  # before HELLO: command 14 does not exist
        assert "HELLO" not in ot.rpc_commands(ot.vendor_files(release)["ggml-rpc.cpp"].read_text())


@pytest.mark.parametrize("release", [r for r, v in ot.RELEASES.items() if v in PROFILES])
def test_profile_matches_the_release(release):
    info = release_info(release)
    p = PROFILES[info["protocol"]]
    assert release in p.releases
    wire = info["wire"]
    assert wire["commands"] == dict(p.commands)
    assert {c for c, k in wire["replies"].items() if k == "none"} == p.no_reply
    assert {c for c, k in wire["replies"].items() if k == "empty"} == p.empty_reply
    assert set(wire["replies"]) | {"HELLO"} == set(p.commands)
    assert wire["hello_request_size"] == p.hello_request_size
    assert wire["hello_response_size"] == p.hello_response_size
    assert wire["rpc_tensor_size"] == 296
    assert wire["rpc_tensor_tail"] == p.rpc_tensor_tail
    assert wire["set_tensor_header_size"] == p.set_tensor_header_size
    assert wire["get_alloc_size_request_size"] == p.get_alloc_size_request_size
    table = op_tables()[p.op_table]
    assert (info["ops"], info["unary"], info["glu"]) == (dict(table["ops"]), dict(table["unary"]),
                                                        dict(table["glu"]))


def test_tensor_flags_match_the_header():
    """spec/graph.md's tensor flags are ggml's enum ggml_tensor_flag of the 7.0.0 release."""
    import re
    from tools.wire_example import FLAG_NAMES
    try:
        header = ot.vendor_files("0.3.36")["ggml.h"].read_text()
    except PeerUnavailable as exc:
        pytest.fail(f"llama-cpp-python 0.3.36 sources unavailable: {exc}", pytrace=False)
    found = {int(v): name for name, v in re.findall(r"GGML_TENSOR_FLAG_(\w+)\s*=\s*(\d+)", header)}
    assert found == FLAG_NAMES
