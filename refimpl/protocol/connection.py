"""Sans-IO connection state machines for both ends of a ggml RPC connection.

Like h11: feed received bytes in with ``receive_data``, take events out with ``next_event``,
and get bytes to send from ``send``.  No sockets, no trio, no threads.  (spec/transport.md,
spec/handshake.md)

Theory of operation
-------------------
A connection is a :class:`State` and a table of the moves out of each state
(:data:`SERVER_TRANSITIONS`, :data:`CLIENT_TRANSITIONS`); every change of state goes through
``_move(event)``, which looks the event up in that table.  Beside the state, a connection
keeps only what the message in hand needs: the server the header of a request whose payload
is still arriving and the command whose reply it owes; the client the queue of replies it
expects (requests may be pipelined), and whether the size of the next one has been read.

The server starts in AWAIT_HELLO.  HELLO moves it to RESPOND (it owes the reply); sending the
reply moves it to IDLE.  From IDLE, a request that has a reply moves it to RESPOND, one
without stays in IDLE, and SET_TENSOR moves it to PAYLOAD until its data has been consumed.
The client frames requests from any live state (HELLO first, once) and reads replies in
order: the first reply (HELLO's) moves it from AWAIT_HELLO to IDLE, a GET_TENSOR reply's
data is a PAYLOAD.  A clean end of stream between messages moves either end to CLOSED.

Errors follow h11: :class:`~.errors.LocalProtocolError` when the caller misuses the API (the
state does not change), :class:`~.errors.RemoteProtocolError` when the peer breaks the
protocol.  Any exception raised while ``next_event`` parses moves the connection to ERROR,
from which nothing leaves.

Bulk payloads (the data of SET_TENSOR on the server side, of a GET_TENSOR reply on the client
side) are never buffered whole here.  The connection announces them with a ``...Start`` event
and then the caller moves exactly ``payload_remaining`` bytes into their destination:
``readinto(view)`` hands over what is already buffered, and once that returns less than
asked, the caller may receive straight into the destination and report it with
``payload_received(n)``.  This lets an upload land directly in device memory.
"""

from __future__ import annotations

import collections
import enum
import struct
from dataclasses import dataclass
from types import MappingProxyType

from .compat import (decode, decode_reply, decode_set_tensor_header, encode,
                     encode_set_tensor_header, payload_size, reply_payload_size,
                     set_tensor_header)
from .constants import CONN_CAPS_SIZE, PROTOCOL_VERSION, Command
from .errors import (HandshakeError, LocalProtocolError, MalformedMessage, OversizeMessage,
                     PeerClosed, RemoteProtocolError, TruncatedMessage, UnknownCommand)
from .messages import (REQUESTS, FixedMessage, HelloRequest, HelloResponse, Message,
                       SetTensorRequest, graph_payload_size)
from .profiles import LATEST, PROFILES, Profile
from .tensor import RpcTensor

__all__ = [
    "NEED_DATA", "ConnectionClosed", "SetTensorStart", "GetTensorStart", "State",
    "SERVER_TRANSITIONS", "CLIENT_TRANSITIONS", "ServerConnection", "ClientConnection",
    "DEFAULT_MAX_MESSAGE_SIZE", "hello_request", "hello_response",
]

_U64 = struct.Struct("<Q")
_REQUEST_HEADER = struct.Struct("<BQ")


class _NeedData:
    def __repr__(self):
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes must be received first.
NEED_DATA = _NeedData()


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection cleanly, at a message boundary."""


@dataclass(frozen=True)
class SetTensorStart:
    """Server side: a SET_TENSOR header arrived; ``size`` data bytes follow as payload."""

    tensor: RpcTensor
    cache_flag: int
    offset: int
    size: int


@dataclass(frozen=True)
class GetTensorStart:
    """Client side: a GET_TENSOR reply began; ``size`` data bytes follow as payload."""

    size: int


class State(enum.Enum):
    """Where a connection is in its life (spec/transport.md, "Connection states")."""

    AWAIT_HELLO = "await-hello"  # nothing but HELLO is acceptable yet
    IDLE = "idle"                # between messages
    PAYLOAD = "payload"          # bulk payload bytes are being consumed by the caller
    RESPOND = "respond"          # server: a request was delivered and its reply is owed
    CLOSED = "closed"            # the peer closed at a message boundary
    ERROR = "error"              # a protocol error happened; the connection is dead


# ----------------------------------------------------------------------------------------------
# Transitions: state -> {event: next state}.  An event missing from a state's row is not
# allowed there.  ERROR is reached from any state by an error and CLOSED and ERROR have no
# way out, so neither has a row.
# ----------------------------------------------------------------------------------------------

_S = State

#: The server's moves.  "hello": HELLO arrived; "request": a request that has a reply
#: arrived; "notice": one without a reply arrived; "set_tensor": a SET_TENSOR header arrived
#: (its data follows); "payload_done": the last data byte was consumed; "reply": the reply
#: owed was framed; "eof": the client closed between messages.
SERVER_TRANSITIONS = MappingProxyType({
    _S.AWAIT_HELLO: {"hello": _S.RESPOND, "eof": _S.CLOSED},
    _S.IDLE: {"request": _S.RESPOND, "notice": _S.IDLE, "set_tensor": _S.PAYLOAD,
              "eof": _S.CLOSED},
    _S.PAYLOAD: {"payload_done": _S.IDLE},
    _S.RESPOND: {"reply": _S.IDLE},
})

#: The client's moves.  "reply": a whole reply was decoded (the first is HELLO's);
#: "get_tensor": a GET_TENSOR reply began (its data follows); "payload_done": its last byte
#: was consumed; "eof": the server closed with no reply outstanding.
CLIENT_TRANSITIONS = MappingProxyType({
    _S.AWAIT_HELLO: {"reply": _S.IDLE, "eof": _S.CLOSED},
    _S.IDLE: {"reply": _S.IDLE, "get_tensor": _S.PAYLOAD, "eof": _S.CLOSED},
    _S.PAYLOAD: {"payload_done": _S.IDLE},
})


class _Buffer:
    """Received bytes not yet consumed, with cheap consumption from the front."""

    def __init__(self):
        self._data = bytearray()
        self._pos = 0

    def __len__(self):
        return len(self._data) - self._pos

    def feed(self, data) -> None:
        if self._pos and self._pos > len(self._data) // 2:
            del self._data[:self._pos]
            self._pos = 0
        self._data += data

    def peek(self, n: int) -> memoryview:
        return memoryview(self._data)[self._pos:self._pos + n]

    def take(self, n: int) -> bytes:
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return out

    def readinto(self, view) -> int:
        n = min(len(view), len(self))
        if n:
            view[:n] = self._data[self._pos:self._pos + n]
            self._pos += n
        return n


class _Connection:
    """What both ends share: buffering, EOF, the state table, and the bulk-payload mechanism."""

    #: This end's moves (:data:`SERVER_TRANSITIONS` or :data:`CLIENT_TRANSITIONS`).
    TRANSITIONS: MappingProxyType

    def __init__(self):
        self._buf = _Buffer()
        self._eof = False
        self.state = State.AWAIT_HELLO
        self.payload_remaining = 0

    # -- the one place the state changes ----------------------------------------------------
    def _move(self, event: str) -> None:
        """Take the move ``event`` out of the current state (LocalProtocolError if none)."""
        try:
            self.state = self.TRANSITIONS[self.state][event]
        except KeyError:
            raise LocalProtocolError(
                f"{event!r} is not allowed in state {self.state.value}") from None

    # -- input ---------------------------------------------------------------------------------
    def receive_data(self, data) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        self._buf.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf)

    def next_event(self):
        """The next event: a message, a ``...Start``, NEED_DATA or ConnectionClosed.

        Raises a :class:`~.errors.RemoteProtocolError` when the peer broke the protocol; the
        connection is then in ERROR and must be closed.
        """
        if self.state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(f"connection is {self.state.value}")
        self._check_readable()
        try:
            return self._read_event()
        except BaseException:
            self.state = State.ERROR
            raise

    def _check_readable(self) -> None:  # pragma: no cover - every end overrides
        """LocalProtocolError when the caller must do something else before reading."""

    def _read_event(self):  # pragma: no cover - every end overrides
        """Parse the next event out of the buffer."""
        raise NotImplementedError

    # -- bulk payload --------------------------------------------------------------------------
    def readinto(self, view) -> int:
        """Move already-buffered payload bytes into ``view``; returns how many were moved.

        Moves at most ``min(len(view), payload_remaining)`` bytes.  When it returns less than
        that, the buffer is empty and the caller may receive into the rest of ``view`` itself.
        A zero-length payload needs no call, but one is harmless.
        """
        if self.payload_remaining == 0 and self.state is not State.PAYLOAD:
            return 0
        self._require(State.PAYLOAD)
        view = memoryview(view).cast("B")[:self.payload_remaining]
        n = self._buf.readinto(view)
        self._consume_payload(n)
        return n

    def payload_received(self, n: int) -> None:
        """Report ``n`` payload bytes that the caller received directly, bypassing the buffer."""
        self._require(State.PAYLOAD)
        if len(self._buf):
            raise LocalProtocolError("payload received directly while bytes were buffered")
        if n < 0 or n > self.payload_remaining:
            raise LocalProtocolError(f"{n} payload bytes reported, {self.payload_remaining} due")
        self._consume_payload(n)

    def _consume_payload(self, n: int) -> None:
        self.payload_remaining -= n
        if self.payload_remaining == 0:
            self._move("payload_done")

    def _start_payload(self, event: str, size: int) -> None:
        """Move by ``event`` into PAYLOAD for ``size`` bytes (straight out again if 0)."""
        self._move(event)
        self.payload_remaining = size
        if size == 0:
            self._move("payload_done")

    # -- helpers -------------------------------------------------------------------------------
    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise LocalProtocolError(f"not allowed in state {self.state.value}")


# ----------------------------------------------------------------------------------------------
# Server side
# ----------------------------------------------------------------------------------------------

#: Default bound on a buffered request payload (GRAPH_COMPUTE is the only large one).
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024


class ServerConnection(_Connection):
    """The server's view of one connection: bytes in, requests out, replies framed.

    ``max_message_size`` bounds every payload the connection buffers (all but SET_TENSOR data,
    which is streamed to its destination and bounded by it).  ``max_tensor_data``, when
    given, bounds SET_TENSOR data from the length prefix alone: no destination can take more
    than the largest buffer the server can allocate.
    """

    TRANSITIONS = SERVER_TRANSITIONS

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_tensor_data: int | None = None, profile: Profile = LATEST):
        super().__init__()
        #: The protocol version this server speaks (spec/versions.md).
        self.profile = profile
        self._set_tensor_header = set_tensor_header(profile)
        self.max_message_size = max_message_size
        self.max_tensor_data = max_tensor_data
        self._header: tuple[int, int] | None = None  # (command, length) of the message in hand
        self._owed: Command | None = None  # in RESPOND: the command whose reply is owed

    @property
    def message_length(self) -> int | None:
        """Payload length of the request whose header has arrived and whose payload has not
        yet been delivered (None between messages or before a whole header is in)."""
        return None if self._header is None else self._header[1]

    @property
    def at_boundary(self) -> bool:
        """True between messages: nothing of a next message has arrived yet."""
        return self._header is None and len(self._buf) == 0 and self.state in (
            State.IDLE, State.AWAIT_HELLO)

    def _check_readable(self) -> None:
        if self.state is State.PAYLOAD:
            raise LocalProtocolError("the SET_TENSOR payload has not been consumed")
        if self.state is State.RESPOND:
            raise LocalProtocolError(f"the reply to {self._owed.name} has not been sent")

    def _read_event(self):
        """The next complete request, a SetTensorStart, NEED_DATA or ConnectionClosed."""
        if self._header is None:
            if len(self._buf) < _REQUEST_HEADER.size:
                return self._at_eof(mid_message=False)
            command, length = _REQUEST_HEADER.unpack(self._buf.take(_REQUEST_HEADER.size))
            self._header = self._check_header(command, length)
        command, length = self._header
        cmd = Command(command)

        if cmd is Command.SET_TENSOR:
            header_size = self._set_tensor_header.size
            if len(self._buf) < header_size:
                return self._at_eof(mid_message=True)
            tensor, flag, offset = decode_set_tensor_header(
                self._buf.take(header_size), self.profile)
            self._header = None
            size = length - header_size
            self._start_payload("set_tensor", size)
            return SetTensorStart(tensor, flag, offset, size)

        if len(self._buf) < length:
            return self._at_eof(mid_message=True)
        payload = self._buf.take(length)
        self._header = None
        request = decode(REQUESTS[cmd], payload, self.profile)
        if cmd is Command.HELLO:
            self._move("hello")
        elif cmd.name in self.profile.no_reply:
            self._move("notice")
        else:
            self._move("request")
        if self.state is State.RESPOND:
            self._owed = cmd
        return request

    def _at_eof(self, mid_message: bool):
        """Called when no complete unit is buffered: NEED_DATA, a clean close, or an error."""
        if not self._eof:
            return NEED_DATA
        if mid_message or len(self._buf):
            raise TruncatedMessage(
                f"connection closed in the middle of a message ({len(self._buf)} bytes pending)")
        self._move("eof")
        return ConnectionClosed()

    def _check_header(self, command: int, length: int) -> tuple[int, int]:
        """Reject a header before reading its payload (spec/transport.md, "Length rules")."""
        if self.state is State.AWAIT_HELLO:
            if command != Command.HELLO:
                raise HandshakeError(
                    f"first command must be HELLO ({int(Command.HELLO)}), got {command}")
            expected = self.profile.hello_request_size
            if length != expected:
                raise HandshakeError(
                    f"HELLO payload must be {expected} bytes, got {length} "
                    f"(a client of {'an older' if length < expected else 'a newer'} "
                    f"protocol version?)")
            return command, length
        if command >= self.profile.command_limit:
            raise UnknownCommand(f"unknown command {command}")
        cmd = Command(command)
        if cmd is Command.HELLO:
            raise HandshakeError("HELLO sent twice on one connection")
        cls = REQUESTS[cmd]
        if issubclass(cls, FixedMessage):
            size = payload_size(cls, self.profile)
            if length != size:
                raise MalformedMessage(f"{cmd.name} payload must be {size} bytes, got {length}")
        elif cmd is Command.SET_TENSOR:
            header_size = self._set_tensor_header.size
            if length < header_size:
                raise MalformedMessage(
                    f"SET_TENSOR payload must be at least {header_size} bytes, got {length}")
            if self.max_tensor_data is not None and \
                    length - header_size > self.max_tensor_data:
                raise OversizeMessage(
                    f"SET_TENSOR announces {length - header_size} data bytes, more "
                    f"than any buffer of this server holds ({self.max_tensor_data})")
        elif cmd is Command.GRAPH_COMPUTE:
            if length < graph_payload_size(0, 0):
                raise MalformedMessage(f"GRAPH_COMPUTE payload too short ({length} bytes)")
            if length > self.max_message_size:
                raise OversizeMessage(
                    f"GRAPH_COMPUTE payload of {length} bytes exceeds the limit of "
                    f"{self.max_message_size}")
        return command, length

    def send(self, response: Message) -> bytes:
        """Frame the reply to the request just delivered."""
        self._require(State.RESPOND)
        if response.COMMAND is not self._owed:
            raise LocalProtocolError(f"{type(response).__name__} does not answer {self._owed.name}")
        payload = encode(response, self.profile)
        self._replied()
        return _U64.pack(len(payload)) + payload

    def send_data_header(self, size: int) -> bytes:
        """Frame the start of a GET_TENSOR reply; the caller sends the ``size`` data bytes."""
        self._require(State.RESPOND)
        if self._owed is not Command.GET_TENSOR:
            raise LocalProtocolError(f"a data reply does not answer {self._owed.name}")
        self._replied()
        return _U64.pack(size)

    def _replied(self) -> None:
        self._move("reply")
        self._owed = None


# ----------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------

class ClientConnection(_Connection):
    """The client's view of one connection: requests framed, replies decoded and checked.

    Requests may be pipelined; replies are matched to requests in order.  The version in the
    HELLO reply is checked against ours (spec/handshake.md, "Version rule").
    """

    TRANSITIONS = CLIENT_TRANSITIONS

    def __init__(self, version: tuple[int, int, int] | None = None, *,
                 profile: Profile | None = None):
        super().__init__()
        if profile is None:
            # A version refimpl has no profile of (tests of the version rule use such ones)
            # is framed as the newest.
            profile = PROFILES.get(tuple(version), LATEST) if version is not None else LATEST
        self.version = tuple(version) if version is not None else profile.version
        #: The wire rules this client frames and decodes with.
        self.profile = profile
        self.server_version: tuple[int, int, int] | None = None
        # (command, reply payload size) of every reply still expected, oldest first
        self._pending: collections.deque[tuple[Command, int]] = collections.deque()
        self._reply_size: int | None = None  # the next reply's size, once its prefix is read

    @property
    def pending(self) -> int:
        """Replies still expected."""
        return len(self._pending)

    @property
    def hello_sent(self) -> bool:
        """Whether HELLO has been framed: its reply is still expected, or has arrived."""
        return self.state is not State.AWAIT_HELLO or bool(self._pending)

    def send(self, request: Message) -> bytes:
        """Frame a whole request (header and payload)."""
        payload = encode(request, self.profile)
        return self._frame(request, len(payload)) + payload

    def send_set_tensor_header(self, tensor: RpcTensor, offset: int, size: int,
                               cache_flag: int = 0) -> bytes:
        """Frame a SET_TENSOR up to its data; the caller sends the ``size`` data bytes next."""
        req = SetTensorRequest(tensor, offset, b"", cache_flag)
        header = encode_set_tensor_header(req, self.profile)
        return self._frame(req, len(header) + size) + header

    def _frame(self, request: Message, length: int) -> bytes:
        if self.state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(f"connection is {self.state.value}")
        cmd = request.COMMAND
        if not self.hello_sent and cmd is not Command.HELLO:
            raise LocalProtocolError("HELLO must be the first request")
        if self.hello_sent and cmd is Command.HELLO:
            raise LocalProtocolError("HELLO may be sent only once")
        if not 0 <= length < 2**64:
            raise LocalProtocolError(f"{cmd.name} payload of {length} bytes cannot be framed")
        if cmd.name not in self.profile.commands:
            raise LocalProtocolError(f"{cmd.name} is not a command of protocol {self.profile.name}")
        if cmd is Command.HELLO or cmd.name not in self.profile.no_reply:
            self._pending.append((cmd, reply_payload_size(request, self.profile)))
        return _REQUEST_HEADER.pack(int(cmd), length)

    def _check_readable(self) -> None:
        if self.state is State.PAYLOAD:
            raise LocalProtocolError("the GET_TENSOR payload has not been consumed")

    def _read_event(self):
        """The next reply, a GetTensorStart, NEED_DATA or ConnectionClosed."""
        if self._reply_size is None:
            if len(self._buf) < _U64.size:
                return self._client_eof()
            if not self._pending:
                raise RemoteProtocolError("the server sent bytes no request asked for")
            (size,) = _U64.unpack(self._buf.take(_U64.size))
            cmd, expected = self._pending[0]
            if size != expected:
                raise MalformedMessage(
                    f"{cmd.name} reply must be {expected} bytes, the server announced {size}")
            self._reply_size = size
        cmd, size = self._pending[0]
        if cmd is Command.GET_TENSOR:
            self._pending.popleft()
            self._reply_size = None
            self._start_payload("get_tensor", size)
            return GetTensorStart(size)
        if len(self._buf) < size:
            return self._client_eof()
        payload = self._buf.take(size)
        self._pending.popleft()
        self._reply_size = None
        reply = decode_reply(cmd, payload, self.profile)
        if cmd is Command.HELLO:
            self._check_version(reply)
        self._move("reply")
        return reply

    def _client_eof(self):
        if not self._eof:
            return NEED_DATA
        if len(self._buf) == 0 and self._reply_size is None and not self._pending:
            self._move("eof")
            return ConnectionClosed()
        raise PeerClosed(
            f"the server closed the connection with {len(self._pending)} replies outstanding"
            + (f" (next: {self._pending[0][0].name})" if self._pending else ""))

    def _check_version(self, reply: HelloResponse) -> None:
        self.server_version = (reply.major, reply.minor, reply.patch)
        if reply.major != self.version[0] or reply.minor > self.version[1]:
            raise HandshakeError(
                "server speaks protocol {}.{}.{}, this client {}.{}.{}".format(
                    *self.server_version, *self.version))


def hello_request() -> HelloRequest:
    """The HELLO a TCP-only peer sends: all-zero capabilities (spec/handshake.md)."""
    return HelloRequest(bytes(CONN_CAPS_SIZE))


def hello_response(version: tuple[int, int, int] = PROTOCOL_VERSION) -> HelloResponse:
    """The HELLO reply of a TCP-only server of ``version``."""
    return HelloResponse(version[0], version[1], version[2], 0, bytes(CONN_CAPS_SIZE))
