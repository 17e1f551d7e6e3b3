"""The sans-IO state machines: framing, handshake, limits, payload streaming, EOF."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.protocol import messages as m
from refimpl.protocol.connection import (NEED_DATA, ClientConnection, ConnectionClosed,
                                         GetTensorStart, ServerConnection, SetTensorStart, State,
                                         hello_request, hello_response)
from refimpl.protocol.constants import Command
from refimpl.protocol.errors import (HandshakeError, LocalProtocolError, MalformedMessage,
                                     OversizeMessage, ProtocolError, UnknownCommand)
from refimpl.protocol.tensor import RpcTensor
from tools.strategies import requests


def frame(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


HELLO = frame(Command.HELLO, bytes(24))


def events(conn, data: bytes = b"", *, eof: bool = False):
    """Feed data and collect events until NEED_DATA/closed; replies owed are auto-sent."""
    if data:
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out = []
    while True:
        if conn.state is State.PAYLOAD:  # finish a payload begun in an earlier chunk
            sink = bytearray(conn.payload_remaining)
            got = conn.readinto(sink)
            out.append(bytes(sink[:got]))
            if conn.state is State.PAYLOAD:
                return out
            continue
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out
        if conn.state is State.RESPOND:
            if isinstance(ev, m.GetTensorRequest):
                conn.send_data_header(ev.size)  # the data itself would be sent by the caller
            else:
                conn.send(_dummy_reply(ev))
        if isinstance(ev, SetTensorStart):
            sink = bytearray(ev.size)
            got = conn.readinto(sink)
            out.append(bytes(sink[:got]))
            if got < ev.size:
                return out


def _dummy_reply(req):
    return m.RESPONSES[req.COMMAND]()


class TestServerHandshake:
    def test_hello_then_idle(self):
        c = ServerConnection()
        assert c.state is State.AWAIT_HELLO
        [req] = events(c, HELLO)
        assert req == m.HelloRequest(bytes(24))
        assert c.state is State.IDLE

    def test_first_command_must_be_hello(self):
        c = ServerConnection()
        c.receive_data(frame(Command.DEVICE_COUNT, b""))
        with pytest.raises(HandshakeError):
            c.next_event()
        assert c.state is State.ERROR

    @pytest.mark.parametrize("size", [0, 23, 25, 2**64 - 1])
    def test_hello_size_must_be_24(self, size):
        c = ServerConnection()
        c.receive_data(struct.pack("<BQ", Command.HELLO, size))
        with pytest.raises(HandshakeError):
            c.next_event()

    def test_second_hello_is_an_error(self):
        c = ServerConnection()
        events(c, HELLO)
        c.receive_data(HELLO)
        with pytest.raises(HandshakeError):
            c.next_event()

    def test_reply_framing(self):
        c = ServerConnection()
        c.receive_data(HELLO)
        c.next_event()
        raw = c.send(hello_response())
        assert raw == struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24)


class TestServerFraming:
    def ready(self, **kw):
        c = ServerConnection(**kw)
        events(c, HELLO)
        return c

    @pytest.mark.parametrize("cmd", [18, 19, 200, 255])
    def test_unknown_commands(self, cmd):
        c = self.ready()
        c.receive_data(frame(cmd, b""))
        with pytest.raises(UnknownCommand):
            c.next_event()

    def test_wrong_fixed_size_is_rejected_before_payload_arrives(self):
        c = self.ready()
        c.receive_data(struct.pack("<BQ", Command.ALLOC_BUFFER, 13))  # no payload sent
        with pytest.raises(MalformedMessage):
            c.next_event()

    def test_device_count_takes_no_payload(self):
        c = self.ready()
        c.receive_data(frame(Command.DEVICE_COUNT, b"x"))
        with pytest.raises(MalformedMessage):
            c.next_event()

    def test_oversize_graph_rejected_from_header_alone(self):
        c = self.ready(max_message_size=1000)
        c.receive_data(struct.pack("<BQ", Command.GRAPH_COMPUTE, 1001))
        with pytest.raises(OversizeMessage):
            c.next_event()

    def test_huge_length_prefix_allocates_nothing(self):
        c = self.ready()
        c.receive_data(struct.pack("<BQ", Command.SET_TENSOR, 2**64 - 1))
        assert c.next_event() is NEED_DATA  # waits for the 305-byte header, buffers nothing
        assert c.buffered == 0

    def test_set_tensor_too_short(self):
        c = self.ready()
        c.receive_data(struct.pack("<BQ", Command.SET_TENSOR, 304))
        with pytest.raises(MalformedMessage):
            c.next_event()

    def test_set_tensor_streams_payload(self):
        c = self.ready()
        t = RpcTensor(id=5, buffer=1, data=2)
        wire = frame(Command.SET_TENSOR, m.SetTensorRequest(t, 9, b"0123456789", 1).encode_payload())
        c.receive_data(wire[:-4])  # the last 4 data bytes have not arrived yet
        start = c.next_event()
        assert start == SetTensorStart(t, 1, 9, 10)
        assert c.state is State.PAYLOAD
        sink = bytearray(10)
        assert c.readinto(sink) == 6
        with pytest.raises(LocalProtocolError):
            c.next_event()  # payload not consumed yet
        sink[6:] = wire[-4:]  # as if received straight from the socket
        c.payload_received(4)
        assert c.state is State.IDLE and sink == b"0123456789"

    def test_payload_received_refuses_overrun(self):
        c = self.ready()
        c.receive_data(frame(Command.SET_TENSOR, m.SetTensorRequest(RpcTensor(), 0, b"ab").encode_payload()))
        c.next_event()
        with pytest.raises(LocalProtocolError):
            c.payload_received(1)  # two bytes are still buffered: must readinto first
        assert c.readinto(bytearray(1)) == 1
        with pytest.raises(LocalProtocolError):
            c.payload_received(2)

    def test_reply_must_match_request(self):
        c = self.ready()
        c.receive_data(frame(Command.DEVICE_COUNT, b""))
        c.next_event()
        with pytest.raises(LocalProtocolError):
            c.send(m.GetAlignmentResponse(32))
        with pytest.raises(LocalProtocolError):
            c.next_event()  # reply still owed
        assert c.send(m.DeviceCountResponse(2)) == struct.pack("<QI", 4, 2)

    def test_no_reply_commands_need_no_send(self):
        c = self.ready()
        [ev] = events(c, frame(Command.FREE_BUFFER, struct.pack("<Q", 7)))
        assert ev == m.FreeBufferRequest(7) and c.state is State.IDLE

    def test_clean_eof(self):
        c = self.ready()
        assert events(c, eof=True) == [ConnectionClosed()]

    @pytest.mark.parametrize("partial", [1, 8, 9, 12])
    def test_eof_mid_message_is_an_error(self, partial):
        c = self.ready()
        c.receive_data(frame(Command.GET_ALIGNMENT, b"\0\0\0\0")[:partial])
        c.receive_data(b"")
        with pytest.raises(MalformedMessage):
            c.next_event()

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(requests, min_size=1, max_size=6), st.data())
    def test_any_chunking_gives_the_same_requests(self, reqs, data):
        reqs = [r for r in reqs if r.COMMAND is not Command.HELLO]
        wire = HELLO + b"".join(frame(r.COMMAND, r.encode_payload()) for r in reqs)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
        c = ServerConnection()
        got = []
        for a, b in zip([0] + cuts, cuts + [len(wire)]):
            got.extend(events(c, wire[a:b]))
        got.extend(events(c, eof=True))
        flat = []
        for ev in got[1:]:
            if isinstance(ev, bytes) and flat and isinstance(flat[-1], list):
                flat[-1][1] += ev
            elif isinstance(ev, SetTensorStart):
                flat.append([ev, b""])
            else:
                flat.append(ev)
        expect = []
        for r in reqs:
            if isinstance(r, m.SetTensorRequest):
                expect.append([SetTensorStart(r.tensor, r.cache_flag, r.offset, len(r.data)), r.data])
            else:
                expect.append(r)
        assert flat == expect + [ConnectionClosed()]


class TestClient:
    def ready(self):
        c = ClientConnection()
        c.send(hello_request())
        c.receive_data(struct.pack("<Q", 28) + hello_response().encode_payload())
        assert isinstance(c.next_event(), m.HelloResponse)
        return c

    def test_hello_first(self):
        c = ClientConnection()
        with pytest.raises(LocalProtocolError):
            c.send(m.DeviceCountRequest())
        assert c.send(hello_request()) == HELLO
        with pytest.raises(LocalProtocolError):
            c.send(hello_request())

    @pytest.mark.parametrize("version,ok", [((7, 0, 0), True), ((7, 0, 9), True),
                                            ((7, 1, 0), False), ((6, 0, 0), False),
                                            ((8, 0, 0), False)])
    def test_version_rule(self, version, ok):
        c = ClientConnection()
        c.send(hello_request())
        c.receive_data(struct.pack("<Q", 28) + hello_response(version).encode_payload())
        if ok:
            assert c.next_event().major == 7
        else:
            with pytest.raises(HandshakeError):
                c.next_event()

    def test_pipelined_replies_in_order(self):
        c = self.ready()
        c.send(m.GetAlignmentRequest(0))
        c.send(m.FreeBufferRequest(1))  # no reply expected
        c.send(m.DeviceCountRequest())
        c.receive_data(struct.pack("<QQ", 8, 32) + struct.pack("<QI", 4, 1))
        assert c.next_event() == m.GetAlignmentResponse(32)
        assert c.next_event() == m.DeviceCountResponse(1)
        assert c.next_event() is NEED_DATA

    def test_wrong_reply_size(self):
        c = self.ready()
        c.send(m.GetAlignmentRequest(0))
        c.receive_data(struct.pack("<Q", 4))
        with pytest.raises(MalformedMessage):
            c.next_event()

    def test_unsolicited_bytes(self):
        c = self.ready()
        c.receive_data(bytes(8))
        with pytest.raises(ProtocolError):
            c.next_event()

    def test_get_tensor_reply_streams(self):
        c = self.ready()
        c.send(m.GetTensorRequest(RpcTensor(), 0, 5))
        c.receive_data(struct.pack("<Q", 5) + b"ab")
        assert c.next_event() == GetTensorStart(5)
        sink = bytearray(5)
        assert c.readinto(sink) == 2
        sink[2:] = b"cde"
        c.payload_received(3)
        assert c.state is State.IDLE and bytes(sink) == b"abcde"

    def test_server_closing_with_reply_outstanding(self):
        c = self.ready()
        c.send(m.DeviceCountRequest())
        c.receive_data(b"")
        with pytest.raises(ProtocolError):
            c.next_event()

    def test_set_tensor_header_frames_the_whole_length(self):
        c = self.ready()
        raw = c.send_set_tensor_header(RpcTensor(id=1), 3, 1000, cache_flag=1)
        cmd, length = struct.unpack_from("<BQ", raw)
        assert cmd == Command.SET_TENSOR and length == 305 + 1000 and len(raw) == 9 + 305
