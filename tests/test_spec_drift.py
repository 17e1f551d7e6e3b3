"""spec/ and refimpl/protocol must not drift apart: every machine-readable table in spec/ is
compared with the declarations the code actually uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refimpl.protocol import messages as m
from refimpl.protocol.constants import COMMAND_LIMIT, Command
from refimpl.protocol.ggml_types import _TRAITS, GgmlType
from refimpl.protocol.tensor import RPC_TENSOR

SPEC = Path(__file__).resolve().parents[1] / "spec"

_KIND_NAMES = {"u8": "u8", "u32": "u32", "u64": "u64", "i32": "i32"}


def tables_after(marker_re: str):
    """{name: rows} for every table that follows a marker comment in spec/*.md."""
    found = {}
    for path in sorted(SPEC.glob("*.md")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            mk = re.fullmatch(marker_re, line.strip())
            if not mk:
                continue
            rows = []
            j = i + 1
            while j < len(lines) and not lines[j].startswith("|"):
                j += 1
            for row in lines[j + 2:]:  # skip header and separator
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            name = mk.group(1) if mk.groups() else path.name
            assert name not in found, f"{name} documented twice"
            found[name] = (path.name, rows)
    return found


LAYOUTS = tables_after(r"<!-- layout: (\w+) -->")


def code_layouts():
    from refimpl.capture.fileformat import HEADER_LAYOUT, RECORD_LAYOUT
    out = {"capture_header": (HEADER_LAYOUT, {}), "capture_record": (RECORD_LAYOUT, {}),
           "rpc_tensor": (RPC_TENSOR, {}), "set_tensor_header": (m.SET_TENSOR_HEADER, {"tensor": "rpc_tensor"}),
           "graph_header": (m.GRAPH_HEADER, {})}
    for cls in list(m.REQUESTS.values()) + list(m.RESPONSES.values()):
        if issubclass(cls, m.FixedMessage) and cls.FIELDS:
            kinds = {}
            for row in cls.FIELDS:
                if row[1] == "tensor":
                    kinds[row[0]] = "rpc_tensor" + (f"[{row[2]}]" if len(row) > 2 else "")
            out[cls.__name__] = (cls.LAYOUT, kinds)
    return out


def expected_type(field, overrides):
    if field.name in overrides:
        return overrides[field.name]
    if field.kind == "char":
        return f"char[{field.count}]"
    return field.kind + (f"[{field.count}]" if field.count > 1 else "")


@pytest.mark.parametrize("name", sorted(code_layouts()))
def test_layout_table_matches_code(name):
    layout, overrides = code_layouts()[name]
    assert name in LAYOUTS, f"spec/ has no '<!-- layout: {name} -->' table"
    doc, rows = LAYOUTS[name]
    documented = [(r[2].strip("`"), int(r[0]), int(r[1]), r[3]) for r in rows]
    actual = [(f.name, f.offset, f.size, expected_type(f, overrides)) for f in layout.fields]
    assert documented == actual, f"{doc}: table for {name} differs from the code"


def test_no_orphan_layout_tables():
    assert set(LAYOUTS) <= set(code_layouts()), "spec documents layouts the code does not have"


def test_command_table_matches_code():
    [(doc, rows)] = tables_after(r"<!-- (commands) -->").values()
    assert len(rows) == COMMAND_LIMIT == len(Command)
    for row in rows:
        cid, name, req, rep = int(row[0]), row[1], row[2], row[3]
        cmd = Command(cid)
        assert cmd.name == name
        cls = m.REQUESTS[cmd]
        if cmd is Command.SET_TENSOR:
            assert req == f"≥ {m.SET_TENSOR_HEADER_SIZE}"
        elif cmd is Command.GRAPH_COMPUTE:
            assert req == f"≥ {m.graph_payload_size(0, 0)}"
        else:
            assert int(req) == cls.payload_size(), name
        if not m.has_response(cmd):
            assert rep == "none", name
        elif cmd is Command.GET_TENSOR:
            assert rep == "= requested size"
        else:
            assert int(rep) == m.RESPONSES[cmd].payload_size(), name


def test_answered_commands_listed_in_transport_spec():
    text = (SPEC / "transport.md").read_text()
    answered = re.search(r"These commands are answered: ([A-Z_,\s]+)\.", text).group(1)
    unanswered = re.search(r"These commands are \*\*never\*\* answered: ([A-Z_,\s]+)\.", text).group(1)
    names = lambda s: {n.strip() for n in s.split(",")}
    assert names(answered) == {c.name for c in m.RESPONSES}
    assert names(unanswered) == {c.name for c in Command if c not in m.RESPONSES}


def test_type_table_matches_code():
    [(doc, rows)] = tables_after(r"<!-- (types) -->").values()
    documented = {int(r[0]): (r[1], int(r[2]), int(r[3])) for r in rows}
    actual = {int(t): (GgmlType(t).name, tr.block_size, tr.type_size) for t, tr in _TRAITS.items()}
    assert documented == actual


def test_stride_examples_match_code():
    from refimpl.protocol.tensor import contiguous_strides, tensor_nbytes
    [(doc, rows)] = tables_after(r"<!-- (strides) -->").values()
    assert rows
    numbers = lambda cell: tuple(int(x) for x in cell.strip("[]").split(","))
    for _, type_name, ne, nb, nbytes in rows:
        t = GgmlType[type_name]
        assert contiguous_strides(t, numbers(ne)) == numbers(nb), (type_name, ne)
        assert tensor_nbytes(t, numbers(ne), numbers(nb)) == int(nbytes), (type_name, ne)


def python_blocks(name: str, heading: str) -> list[str]:
    """The ```python blocks of section ``heading`` of spec/``name``."""
    text = (SPEC / name).read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_numpy_example_runs():
    import numpy as np
    from refimpl.protocol.tensor import contiguous_strides
    [code] = python_blocks("tensor.md", "Shape and strides")
    exec(code, {"np": np, "contiguous_strides": contiguous_strides, "GgmlType": GgmlType})


def test_graph_example_is_what_the_encoder_writes():
    from tools.wire_example import add_graph_frame, annotated_dump, parse_dump
    text = (SPEC / "graph.md").read_text()
    block = re.search(r"<!-- graph-example -->\n```\n(.*?)```", text, re.S).group(1)
    frame = add_graph_frame()
    assert parse_dump(block) == frame, "the hex of spec/graph.md's example is not the encoding"
    assert block.rstrip("\n") == annotated_dump(frame), "run python -m tools.wire_example"


def test_tensor_flag_table():
    from tools.wire_example import FLAG_NAMES
    [(doc, rows)] = tables_after(r"<!-- (tensor-flags) -->").values()
    assert {int(r[0]): r[1] for r in rows} == FLAG_NAMES


def test_protocol_version_in_spec_title():
    from refimpl.protocol.constants import PROTOCOL_VERSION
    assert "version %d.%d.%d" % PROTOCOL_VERSION in (SPEC / "README.md").read_text()


NUMERICS = tables_after(r"<!-- table: ([\w-]+) -->")


def _number(text: str) -> float:
    """A number as the spec writes it: ``5·10⁻⁴``, ``10⁻⁶``, ``0``, ``2 ×``, ``97 %``."""
    sup = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
    m = re.search(r"(?:(\d+(?:\.\d+)?)·)?10([⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)", text)
    if m:
        return float(m.group(1) or 1) * 10.0 ** int(m.group(2).translate(sup))
    return float(re.search(r"\d+(?:\.\d+)?", text).group(0))


def test_nmse_bounds_match_contract_code():
    from tools.contract import DEFAULT_NMSE_BOUND, nmse_bound
    _, rows = NUMERICS["nmse-bounds"]
    assert rows
    for ops, bound in rows:
        want = _number(bound)
        if ops.startswith("every other op"):
            names = re.findall(r"[A-Z][A-Z_]+", ops)
            assert DEFAULT_NMSE_BOUND == want
            for op in names:
                if op != "CPY":
                    assert nmse_bound(op) == want, op
            continue
        same = "same type" in ops
        for op in re.findall(r"\b[A-Z][A-Z_]+\b", ops):
            assert nmse_bound(op, same_type_copy=same) == want, (op, bound)


def test_e2e_bands_match_contract_code():
    from tools import contract as c
    _, rows = NUMERICS["e2e-bands"]
    bands = {stat: rule for stat, rule in rows}
    kld = bands["mean KLD"]
    assert re.findall(r"max\((\d+) ×", kld) == [str(int(c.KLD_MARGIN))]
    assert _number(kld.split(",")[1]) == c.KLD_FLOOR
    top = bands["same top token"]
    assert int(re.search(r"− (\d+) points", top).group(1)) / 100 == c.SAME_TOP_MARGIN
    assert int(re.search(r"(\d+) %\)", top).group(1)) / 100 == c.SAME_TOP_FLOOR
    ppl = bands["ln PPL ratio, its magnitude"]
    assert re.findall(r"max\((\d+) ×", ppl) == [str(int(c.KLD_MARGIN))]
    assert _number(ppl.split(",")[1]) == c.LOG_PPL_FLOOR
    assert int(re.search(r"(\d+) × its own standard error", ppl).group(1)) == c.LOG_PPL_SIGMAS


def _family_rows() -> list[tuple[set[str], str]]:
    """(op names, linked page) of every row of spec/graph-ops.md's Families table."""
    text = (SPEC / "graph-ops.md").read_text()
    table = text.split("## Families", 1)[1]
    rows = []
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    for line in lines[start + 2:]:  # below the header and its separator
        if not line.startswith("|"):
            break
        ops_cell, rules = (c.strip() for c in line.strip().strip("|").split("|")[:2])
        link = re.search(r"\]\(([^)#]+)", rules)
        rows.append(({n.strip() for n in ops_cell.split(",")}, link.group(1) if link else ""))
    return rows


def test_every_op_of_the_wire_has_its_rules():
    """spec/graph-ops.md describes every op a 7.0.0 graph can carry (issue 14): each op of
    ``enum ggml_op`` is in exactly one row of the Families table, whose page exists, except the
    four custom ops, which the common rules refuse by name."""
    from refimpl.graph.ops import Op
    custom = {"MAP_CUSTOM1", "MAP_CUSTOM2", "MAP_CUSTOM3", "CUSTOM"}
    listed: list[str] = []
    for names, page in _family_rows():
        listed += names
        if page:
            assert (SPEC / page).is_file(), f"graph-ops.md links to a missing {page}"
    assert len(listed) == len(set(listed)), "an op is listed in two families"
    missing = {op.name for op in Op} - custom - set(listed)
    assert not missing, f"ops without a row in graph-ops.md: {sorted(missing)}"
    assert not set(listed) - {op.name for op in Op}, "graph-ops.md lists an op ggml lacks"
    common = (SPEC / "graph-ops.md").read_text().split("## Families", 1)[0]
    for name in custom:
        assert name in common


def test_every_implemented_op_is_specified():
    """Every op the server validates is in the Families table, and every UNARY and GLU sub-op
    is named in spec/ops/unary.md."""
    import refimpl.graph  # noqa: F401  (registers the validators)
    from refimpl.graph.ops import GluOp, Op, UnaryOp
    from refimpl.graph.registry import validated_ops
    listed = set().union(*(names for names, _ in _family_rows()))
    assert {Op(op).name for op in validated_ops()} <= listed
    unary_page = (SPEC / "ops" / "unary.md").read_text()
    for sub in [*UnaryOp, *GluOp]:
        assert re.search(rf"\b{sub.name}\b", unary_page), f"{sub.name} missing from ops/unary.md"
