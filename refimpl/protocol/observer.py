"""Passive parsing of both directions of a connection (for proxies and captures).

An :class:`Observer` is fed bytes as they pass in either direction and returns complete,
framed messages: requests (client to server) and replies (server to client), each with its
exact wire bytes and a decoded object.  It never produces bytes of its own.  Replies are
matched to requests the way a client matches them: in order, only for commands that have a
reply, and with GET_TENSOR's size taken from its request (spec/transport.md).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass

from .constants import Command
from .errors import ProtocolError
from .messages import REQUESTS, RESPONSES, has_response

_REQ_HEADER = struct.Struct("<BQ")
_U64 = struct.Struct("<Q")

CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1


@dataclass
class Observed:
    """One complete message: direction, command, its wire bytes, and the decoded message
    (None when it could not be decoded: the raw bytes are still there)."""

    direction: int
    command: int
    raw: bytes
    message: object | None
    error: str | None = None


class _Stream:
    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class Observer:
    """Frames both directions of one connection (whole messages are buffered: it is meant
    for captures, which keep every byte anyway)."""

    def __init__(self):
        self._c2s = _Stream()
        self._s2c = _Stream()
        self._expect: collections.deque[tuple[int, int | None]] = collections.deque()
        self.hello_done = False

    # -- client to server -------------------------------------------------------------------
    def from_client(self, data: bytes) -> list[Observed]:
        """Feed client bytes; returns the requests they complete."""
        self._c2s.feed(data)
        out = []
        while len(self._c2s.buf) >= _REQ_HEADER.size:
            cmd, length = _REQ_HEADER.unpack_from(self._c2s.buf)
            if len(self._c2s.buf) < _REQ_HEADER.size + length:
                break
            raw = self._c2s.take(_REQ_HEADER.size + length)
            out.append(self._request(cmd, raw))
        return out

    def _request(self, cmd: int, raw: bytes) -> Observed:
        payload = raw[_REQ_HEADER.size:]
        msg, err = None, None
        try:
            command = Command(cmd)
            msg = REQUESTS[command].decode_payload(payload)
        except (ValueError, ProtocolError, KeyError) as exc:
            err = str(exc) or type(exc).__name__
        if msg is not None and has_response(msg.COMMAND):
            size = msg.size if msg.COMMAND is Command.GET_TENSOR else RESPONSES[msg.COMMAND].payload_size()
            self._expect.append((cmd, size))
        return Observed(CLIENT_TO_SERVER, cmd, raw, msg, err)

    # -- server to client -------------------------------------------------------------------
    def from_server(self, data: bytes) -> list[Observed]:
        """Feed server bytes; returns the replies they complete."""
        self._s2c.feed(data)
        out = []
        while len(self._s2c.buf) >= _U64.size:
            (length,) = _U64.unpack_from(self._s2c.buf)
            if len(self._s2c.buf) < _U64.size + length:
                break
            raw = self._s2c.take(_U64.size + length)
            cmd, expected = self._expect.popleft() if self._expect else (-1, None)
            msg, err = None, None
            if cmd < 0:
                err = "reply to no request"
            elif expected is not None and expected != length:
                err = f"reply of {length} bytes, {expected} expected"
            else:
                try:
                    msg = RESPONSES[Command(cmd)].decode_payload(raw[_U64.size:])
                except (ValueError, ProtocolError) as exc:
                    err = str(exc)
            out.append(Observed(SERVER_TO_CLIENT, cmd, raw, msg, err))
        return out

    @property
    def pending_replies(self) -> int:
        """Replies the client still waits for."""
        return len(self._expect)
