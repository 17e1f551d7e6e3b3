"""Codec round trips for every message, plus exact byte layouts of representative ones."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.protocol import messages as m
from refimpl.protocol.constants import Command
from refimpl.protocol.errors import MalformedMessage
from refimpl.protocol.tensor import RPC_TENSOR_SIZE, RpcTensor
from tools.strategies import REQUEST_STRATEGIES, RESPONSE_STRATEGIES, rpc_tensors


def test_every_command_has_a_request_strategy_and_class():
    assert set(m.REQUESTS) == set(Command)
    assert set(REQUEST_STRATEGIES) == set(m.REQUESTS.values())
    assert set(RESPONSE_STRATEGIES) == set(m.RESPONSES.values())


@pytest.mark.parametrize("cls", list(REQUEST_STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_request_round_trip(cls, data):
    msg = data.draw(REQUEST_STRATEGIES[cls])
    payload = msg.encode_payload()
    if issubclass(cls, m.FixedMessage):
        assert len(payload) == cls.payload_size()
    again = cls.decode_payload(payload)
    assert again == msg
    assert again.encode_payload() == payload


@pytest.mark.parametrize("cls", list(RESPONSE_STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_response_round_trip(cls, data):
    msg = data.draw(RESPONSE_STRATEGIES[cls])
    payload = msg.encode_payload()
    assert cls.decode_payload(payload) == msg


@given(rpc_tensors())
def test_tensor_round_trip(t):
    raw = t.encode()
    assert len(raw) == RPC_TENSOR_SIZE == 296
    assert RpcTensor.decode(raw) == t


@pytest.mark.parametrize("cls", [c for c in m.REQUESTS.values() if issubclass(c, m.FixedMessage)],
                         ids=lambda c: c.__name__)
def test_fixed_requests_reject_wrong_lengths(cls):
    good = cls().encode_payload()
    with pytest.raises(MalformedMessage):
        cls.decode_payload(good + b"\0")
    if good:
        with pytest.raises(MalformedMessage):
            cls.decode_payload(good[:-1])


def test_tensor_field_bytes_are_where_the_spec_says():
    t = RpcTensor(id=0x1122334455667788, type=8, buffer=0xAABB, ne=(1, 2, 3, 4),
                  nb=(5, 6, 7, 8), op=9, op_params=tuple(range(16)), flags=-2,
                  src=tuple(range(100, 110)), view_src=0xF00D, view_offs=77, data=0xBEEF,
                  name=b"tok_embd".ljust(64, b"\0"), use_count=3)
    raw = t.encode()
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x1122334455667788
    assert struct.unpack_from("<I", raw, 8)[0] == 8
    assert struct.unpack_from("<Q", raw, 12)[0] == 0xAABB
    assert struct.unpack_from("<4I", raw, 20) == (1, 2, 3, 4)
    assert struct.unpack_from("<4I", raw, 36) == (5, 6, 7, 8)
    assert struct.unpack_from("<I", raw, 52)[0] == 9
    assert struct.unpack_from("<16i", raw, 56) == tuple(range(16))
    assert struct.unpack_from("<i", raw, 120)[0] == -2
    assert struct.unpack_from("<10Q", raw, 124) == tuple(range(100, 110))
    assert struct.unpack_from("<QQQ", raw, 204) == (0xF00D, 77, 0xBEEF)
    assert raw[228:236] == b"tok_embd" and raw[236:292] == bytes(56)
    assert struct.unpack_from("<i", raw, 292)[0] == 3
    assert t.label == "tok_embd"


def test_set_tensor_payload_layout():
    t = RpcTensor(id=1)
    msg = m.SetTensorRequest(t, offset=0x0102, data=b"xyz", cache_flag=1)
    raw = msg.encode_payload()
    assert raw[:296] == t.encode()
    assert raw[296] == 1
    assert struct.unpack_from("<Q", raw, 297)[0] == 0x0102
    assert raw[305:] == b"xyz"
    with pytest.raises(MalformedMessage):
        m.SetTensorRequest.decode_payload(raw[:304])


def test_graph_payload_layout_and_exact_size():
    t1, t2 = RpcTensor(id=11), RpcTensor(id=22, src=(11,) + (0,) * 9)
    msg = m.GraphComputeRequest.from_tensors(3, [22], [t1, t2])
    raw = msg.encode_payload()
    assert struct.unpack_from("<II", raw, 0) == (3, 1)
    assert struct.unpack_from("<Q", raw, 8)[0] == 22
    assert struct.unpack_from("<I", raw, 16)[0] == 2
    assert raw[20:20 + 296] == t1.encode()
    assert len(raw) == m.graph_payload_size(1, 2) == 20 + 2 * 296
    assert msg.tensor(1) == t2
    with pytest.raises(MalformedMessage):
        m.GraphComputeRequest.decode_payload(raw + b"\0")  # trailing garbage
    with pytest.raises(MalformedMessage):
        m.GraphComputeRequest.decode_payload(raw[:-1])
    huge_nodes = struct.pack("<II", 0, 2**32 - 1) + bytes(8)
    with pytest.raises(MalformedMessage):
        m.GraphComputeRequest.decode_payload(huge_nodes)


def test_hello_response_layout():
    raw = m.HelloResponse(7, 1, 2, 0, bytes(range(24))).encode_payload()
    assert raw == bytes([7, 1, 2, 0]) + bytes(range(24))
