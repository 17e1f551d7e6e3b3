"""Our protocol constants against the peer itself: its headers, its sources, its libraries.

These read the llama.cpp tree the peers are built from (never copied into this repository) and
load its libggml-base through ctypes, so a new upstream release that changes a number is
caught here first.
"""

from __future__ import annotations

import ctypes
import re

import pytest

from refimpl.protocol import messages as m
from refimpl.protocol.constants import (CONN_CAPS_SIZE, MAX_DIMS, MAX_NAME, MAX_OP_PARAMS,
                                        MAX_SRC, PROTOCOL_VERSION, Command)
from refimpl.protocol.ggml_types import REMOVED_TYPES, TYPE_COUNT, type_traits
from refimpl.protocol.tensor import RPC_TENSOR

pytestmark = pytest.mark.peer


def rpc_source(peer_source):
    return (peer_source / "ggml/src/ggml-rpc/ggml-rpc.cpp").read_text()


def test_protocol_version(peer_source):
    header = (peer_source / "ggml/include/ggml-rpc.h").read_text()
    got = tuple(int(re.search(rf"RPC_PROTO_{p}_VERSION\s+(\d+)", header).group(1))
                for p in ("MAJOR", "MINOR", "PATCH"))
    assert got == PROTOCOL_VERSION


def test_ggml_limits(peer_source):
    h = (peer_source / "ggml/include/ggml.h").read_text()
    for name, ours in [("GGML_MAX_DIMS", MAX_DIMS), ("GGML_MAX_SRC", MAX_SRC),
                       ("GGML_MAX_OP_PARAMS", MAX_OP_PARAMS), ("GGML_MAX_NAME", MAX_NAME)]:
        assert int(re.search(rf"#\s*define {name}\s+(\d+)", h).group(1)) == ours, name
    tr = (peer_source / "ggml/src/ggml-rpc/transport.h").read_text()
    assert int(re.search(r"RPC_CONN_CAPS_SIZE\s*=\s*(\d+)", tr).group(1)) == CONN_CAPS_SIZE


def test_command_numbers(peer_source):
    body = re.search(r"enum rpc_cmd \{(.*?)\};", rpc_source(peer_source), re.S).group(1)
    names = [re.match(r"\s*RPC_CMD_(\w+)", line).group(1) for line in body.split(",")
             if re.match(r"\s*RPC_CMD_\w+", line)]
    assert names[:len(Command)] == [c.name for c in sorted(Command)]
    assert names[len(Command):] == ["NONE", "COUNT"]


_CTYPES = {"uint64_t": 8, "uint32_t": 4, "int32_t": 4, "uint8_t": 1, "char": 1}
_CONSTS = {"GGML_MAX_DIMS": MAX_DIMS, "GGML_MAX_SRC": MAX_SRC, "GGML_MAX_NAME": MAX_NAME,
           "GGML_MAX_OP_PARAMS / sizeof(int32_t)": MAX_OP_PARAMS // 4,
           "RPC_CONN_CAPS_SIZE": CONN_CAPS_SIZE}


def packed_layout(src: str, struct_name: str):
    """(field, offset, size) of a packed struct in the peer source; rpc_tensor fields count 296."""
    body = re.search(rf"struct {struct_name} \{{(.*?)\}};", src, re.S).group(1)
    rows, offset = [], 0
    for decl in re.finditer(r"(\w+)\s+(\w+)(?:\[([^\]]+)\])?;", body):
        ctype, name, count = decl.group(1), decl.group(2), decl.group(3)
        n = 1 if count is None else (_CONSTS[count.strip()] if not count.strip().isdigit() else int(count))
        size = (RPC_TENSOR.size if ctype == "rpc_tensor" else _CTYPES[ctype]) * n
        rows.append((name, offset, size))
        offset += size
    return rows


@pytest.mark.parametrize("struct_name,layout", [
    ("rpc_tensor", RPC_TENSOR),
    ("rpc_msg_hello_req", m.HelloRequest.LAYOUT), ("rpc_msg_hello_rsp", m.HelloResponse.LAYOUT),
    ("rpc_msg_alloc_buffer_req", m.AllocBufferRequest.LAYOUT),
    ("rpc_msg_alloc_buffer_rsp", m.AllocBufferResponse.LAYOUT),
    ("rpc_msg_get_alloc_size_req", m.GetAllocSizeRequest.LAYOUT),
    ("rpc_msg_memset_tensor_req", m.MemsetTensorRequest.LAYOUT),
    ("rpc_msg_set_tensor_hash_req", m.SetTensorHashRequest.LAYOUT),
    ("rpc_msg_get_tensor_req", m.GetTensorRequest.LAYOUT),
    ("rpc_msg_copy_tensor_req", m.CopyTensorRequest.LAYOUT),
    ("rpc_msg_buffer_clear_req", m.BufferClearRequest.LAYOUT),
    ("rpc_msg_get_device_memory_rsp", m.GetDeviceMemoryResponse.LAYOUT),
])
def test_struct_offsets_and_sizes(peer_source, struct_name, layout):
    theirs = packed_layout(rpc_source(peer_source), struct_name)
    assert [(o, s) for _, o, s in theirs] == [(f.offset, f.size) for f in layout.fields]
    assert sum(s for _, _, s in theirs) == layout.size


def test_type_geometry_from_the_peer_library(peer_bin):
    lib = ctypes.CDLL(str(peer_bin / "libggml-base.so"))
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_name.restype = ctypes.c_char_p
    for t in range(TYPE_COUNT):
        blck, size = lib.ggml_blck_size(t), lib.ggml_type_size(t)
        ours = type_traits(t)
        if t in REMOVED_TYPES:
            assert ours is None and blck == 0
        else:
            assert (ours.block_size, ours.type_size) == (blck, size), t
            assert ours.name == lib.ggml_type_name(t).decode()


def _struct_nmse_bound(source: str, struct: str) -> str:
    """The body of ``max_nmse_err()`` (without a backend argument) in ``struct test_<x>``."""
    start = source.index(f"struct {struct} : public test_case {{")
    end = source.find("\nstruct test_", start + 1)
    body = source[start:end]
    m_ = re.search(r"double max_nmse_err\(\) override \{(.*?)\n    \}", body, re.S)
    assert m_, f"{struct} has no max_nmse_err() override"
    return m_.group(1)


def test_nmse_bounds_are_test_backend_ops(peer_source):
    """spec/numerics.md's per-op bounds are test-backend-ops' (tools.contract)."""
    from tools.contract import DEFAULT_NMSE_BOUND, NMSE_BOUNDS
    src = (peer_source / "tests/test-backend-ops.cpp").read_text()
    default = re.search(r"virtual double max_nmse_err\(\) \{\s*return ([0-9.e-]+);", src)
    assert float(default.group(1)) == DEFAULT_NMSE_BOUND
    structs = {"MUL_MAT": "test_mul_mat", "MUL_MAT_ID": "test_mul_mat_id",
               "OUT_PROD": "test_out_prod", "FLASH_ATTN_EXT": "test_flash_attn_ext",
               "SOFT_MAX": "test_soft_max", "CONV_2D": "test_conv_2d",
               "CONV_TRANSPOSE_2D": "test_conv_transpose_2d"}
    assert set(structs) == set(NMSE_BOUNDS)
    for op, struct in structs.items():
        body = _struct_nmse_bound(src, struct)
        assert float(re.search(r"return ([0-9.e-]+);", body).group(1)) == NMSE_BOUNDS[op], op
    # a same-type copy is exact; every other op of refimpl's keeps the default bound
    assert "if (type_src == type_dst) {\n            return 0.0;" in _struct_nmse_bound(src, "test_cpy")
    for struct in ("test_unary", "test_glu", "test_rms_norm", "test_norm", "test_rope",
                   "test_scale", "test_get_rows", "test_set_rows"):
        start = src.index(f"struct {struct} : public test_case {{")
        body = src[start:src.find("\nstruct test_", start + 1)]
        assert "max_nmse_err" not in body or struct == "test_set_rows", struct
