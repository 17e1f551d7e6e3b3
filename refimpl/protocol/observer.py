"""Passive parsing of both directions of a connection (for proxies and captures).

An :class:`Observer` is fed bytes as they pass in either direction and returns complete,
framed messages: requests (client to server) and replies (server to client), each with its
exact wire bytes and a decoded object.  It never produces bytes of its own.  Replies are
matched to requests the way a client matches them: in order, only for commands that have a
reply, and with GET_TENSOR's size taken from its request (spec/transport.md).

Which protocol version the connection speaks is learned from the handshake (spec/versions.md):
the observer starts with the newest profile (or the one it is given), and the HELLO reply's
version selects the profile every later message is framed and decoded with: which commands
are answered, with an empty reply or not at all, and the SET_TENSOR and GET_ALLOC_SIZE layouts.
A HELLO with an empty payload (3.x) is answered with 3 bytes; a version without a profile keeps
the newest one and says so in :attr:`Observer.profile_note`.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass

from .compat import decode, decode_reply, has_response, reply_payload_size
from .constants import Command
from .errors import ProtocolError
from .messages import REQUESTS, HelloResponse
from .profiles import LATEST, PROFILES, Profile

__all__ = ["CLIENT_TO_SERVER", "SERVER_TO_CLIENT", "Observed", "Observer"]

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

    def __init__(self, profile: Profile | None = None):
        self._c2s = _Stream()
        self._s2c = _Stream()
        self._expect: collections.deque[tuple[int, int | None]] = collections.deque()
        self.hello_done = False
        #: The profile messages are decoded with; set from the HELLO reply unless given.
        self.profile: Profile = profile or LATEST
        self._fixed = profile is not None
        #: Why the profile could not follow the HELLO reply (None when it could).
        self.profile_note: str | None = None

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
        if cmd == Command.HELLO and not self.hello_done and not self._fixed:
            # The HELLO request's length tells the 3.x family (empty) from 4.0.0 on (24 bytes);
            # the reply's version then picks the exact profile.
            if len(payload) == 0 and self.profile.hello_request_size != 0:
                self.profile = PROFILES[(3, 6, 1)]
        try:
            command = Command(cmd)
            msg = decode(REQUESTS[command], payload, self.profile)
        except (ValueError, ProtocolError, KeyError) as exc:
            err = str(exc) or type(exc).__name__
        if msg is not None and has_response(msg.COMMAND, self.profile):
            self._expect.append((cmd, reply_payload_size(msg, self.profile)))
        return Observed(CLIENT_TO_SERVER, cmd, raw, msg, err)

    def _learn_version(self, reply: HelloResponse) -> None:
        self.hello_done = True
        if self._fixed:
            return
        version = (reply.major, reply.minor, reply.patch)
        found = PROFILES.get(version)
        if found is None:
            self.profile_note = ("protocol %d.%d.%d has no profile; decoding as %s"
                                 % (*version, self.profile.name))
        else:
            self.profile = found

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
                    msg = decode_reply(Command(cmd), raw[_U64.size:], self.profile)
                except (ValueError, ProtocolError) as exc:
                    err = str(exc)
                if isinstance(msg, HelloResponse):
                    self._learn_version(msg)
            out.append(Observed(SERVER_TO_CLIENT, cmd, raw, msg, err))
        return out

    @property
    def pending_replies(self) -> int:
        """Replies the client still waits for."""
        return len(self._expect)
