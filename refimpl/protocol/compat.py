"""Protocol versions before 7.0.0, as a layer over the 7.0.0 catalogue (spec/versions.md).

:mod:`.messages` describes 7.0.0 alone.  Everything an older version does differently on the
wire is data in its :class:`~.profiles.Profile`, and this module is the one place that reads
those fields to lay a message out:

* shorter fixed payloads (``hello_request_size``, ``hello_response_size``,
  ``get_alloc_size_request_size``).  The missing part is always a suffix of the 7.0.0 layout
  (HELLO's capability block, GET_ALLOC_SIZE's sources before 3.6.0): encoding truncates,
  decoding pads with zeros;
* the SET_TENSOR header without the cache flag (``set_tensor_header_size``, before 7.0.0);
* replies 7.0.0 does not send: the empty reply of FREE_BUFFER and friends
  (``empty_reply``, before 6.0.0) and GRAPH_COMPUTE's status (3.0.0; ``no_reply``).

Every function takes the profile last and defaults to the newest, so a 7.0.0 caller may use
them too (the connections always do).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from .constants import Command
from .errors import MalformedMessage
from .layout import Layout
from .messages import (RESPONSES, SET_TENSOR_HEADER, FixedMessage, GetAllocSizeRequest,
                       HelloRequest, HelloResponse, Message, SetTensorRequest)
from .profiles import LATEST, Profile
from .tensor import RPC_TENSOR_SIZE, RpcTensor

__all__ = [
    "GraphComputeResponse", "EmptyReply", "OLDER_RESPONSES", "SET_TENSOR_HEADER_NO_FLAG",
    "set_tensor_header", "encode_set_tensor_header", "decode_set_tensor_header",
    "payload_size", "encode", "decode", "has_response", "response_class",
    "reply_payload_size", "decode_reply",
]


# ------------------------------------------------------------------------------------------
# Replies only older versions send
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphComputeResponse(FixedMessage):
    """Reply to GRAPH_COMPUTE in protocol 3.0.0 only (spec/versions.md#300): ggml's status
    of the computation, 0 for success.  From 3.5.0 on GRAPH_COMPUTE has no reply."""

    COMMAND = Command.GRAPH_COMPUTE
    FIELDS = [("status", "u8")]
    status: int = 0


@dataclass(frozen=True)
class EmptyReply(Message):
    """The reply of length 0 that versions before 6.0.0 send to FREE_BUFFER, BUFFER_CLEAR,
    INIT_TENSOR (and MEMSET_TENSOR in 5.x): the 8-byte size and no payload."""

    command: Command = Command.FREE_BUFFER

    @property
    def COMMAND(self):  # noqa: N802 - the attribute every message has
        return self.command

    def encode_payload(self) -> bytes:
        """Nothing."""
        return b""

    @classmethod
    def decode_payload(cls, payload):  # pragma: no cover - decode_reply builds it
        """An empty payload (any other is malformed)."""
        if len(payload):
            raise MalformedMessage(f"an empty reply has {len(payload)} bytes")
        return cls()


#: Replies that only older protocol versions send (which versions: ``Profile.no_reply``).
OLDER_RESPONSES = MappingProxyType({Command.GRAPH_COMPUTE: GraphComputeResponse})


# ------------------------------------------------------------------------------------------
# SET_TENSOR's header
# ------------------------------------------------------------------------------------------

#: The SET_TENSOR header before 7.0.0: tensor, offset (u64); no cache flag (6.0.0 and older).
SET_TENSOR_HEADER_NO_FLAG = Layout("set_tensor_header_no_flag", [
    ("tensor", "char", RPC_TENSOR_SIZE), ("offset", "u64")])
_SET_TENSOR_HEADERS = {L.size: L for L in (SET_TENSOR_HEADER, SET_TENSOR_HEADER_NO_FLAG)}


def set_tensor_header(profile: Profile | None = None) -> Layout:
    """The SET_TENSOR header layout of ``profile`` (default: the newest)."""
    return _SET_TENSOR_HEADERS[(profile or LATEST).set_tensor_header_size]


def encode_set_tensor_header(request: SetTensorRequest, profile: Profile | None = None) -> bytes:
    """The bytes of ``request`` that precede its data, as ``profile`` lays them out (a
    version without the cache flag drops it)."""
    return set_tensor_header(profile).pack(request.header_values())


def decode_set_tensor_header(header, profile: Profile | None = None) -> tuple[RpcTensor, int, int]:
    """``(tensor, cache_flag, offset)`` from a SET_TENSOR header (flag 0 where it is absent)."""
    v = set_tensor_header(profile).unpack(header)
    return RpcTensor.decode(v["tensor"]), v.get("cache_flag", 0), v["offset"]


# ------------------------------------------------------------------------------------------
# Fixed payloads: sizes and codecs per profile
# ------------------------------------------------------------------------------------------

#: Fixed messages whose size changed between versions -> the Profile field that holds it.
_SIZE_FIELDS: dict[type[Message], str] = {
    HelloRequest: "hello_request_size",
    HelloResponse: "hello_response_size",
    GetAllocSizeRequest: "get_alloc_size_request_size",
}


def payload_size(cls: type[Message], profile: Profile | None = None) -> int | None:
    """Exact payload size of a fixed message under ``profile`` (None for variable ones)."""
    if not issubclass(cls, FixedMessage):
        return None
    field = _SIZE_FIELDS.get(cls)
    return getattr(profile or LATEST, field) if field else cls.payload_size()


def encode(message: Message, profile: Profile | None = None) -> bytes:
    """The payload of ``message`` as ``profile`` (default: the newest) lays it out."""
    if isinstance(message, SetTensorRequest):
        return encode_set_tensor_header(message, profile) + bytes(message.data)
    payload = message.encode_payload()
    size = payload_size(type(message), profile)
    return payload if size is None or size == len(payload) else payload[:size]


def decode(cls: type[Message], payload, profile: Profile | None = None) -> Message:
    """Decode a complete payload of ``cls`` as ``profile`` lays it out."""
    if cls is SetTensorRequest:
        size = set_tensor_header(profile).size
        if len(payload) < size:
            raise MalformedMessage(
                f"SET_TENSOR payload must be at least {size} bytes, got {len(payload)}")
        tensor, flag, offset = decode_set_tensor_header(payload, profile)
        return cls(tensor, offset, bytes(payload[size:]), flag)
    size = payload_size(cls, profile)
    if size is not None and size != cls.payload_size():
        if len(payload) != size:
            raise MalformedMessage(
                f"{cls.__name__} payload must be {size} bytes, got {len(payload)}")
        payload = bytes(payload) + bytes(cls.payload_size() - size)
    return cls.decode_payload(payload)


# ------------------------------------------------------------------------------------------
# Replies per profile
# ------------------------------------------------------------------------------------------

def has_response(command: Command, profile: Profile | None = None) -> bool:
    """Whether the server answers ``command`` (spec/commands.md, "Which commands answer");
    with an empty reply counts (``profile``'s ``empty_reply``, before 6.0.0)."""
    if profile is None or profile is LATEST:
        return command in RESPONSES
    return command.name in profile.commands and command.name not in profile.no_reply


def response_class(command: Command) -> type[Message]:
    """The reply class of ``command`` in whichever version answers it (KeyError: none does)."""
    cls = RESPONSES.get(command)
    return cls if cls is not None else OLDER_RESPONSES[command]


def reply_payload_size(request: Message, profile: Profile | None = None) -> int:
    """Payload bytes of the reply to ``request`` (a command that has one) under ``profile``:
    GET_TENSOR's is the size it asked for, an empty reply's 0, any other the reply's fixed
    size (spec/commands.md)."""
    profile = profile or LATEST
    if request.COMMAND is Command.GET_TENSOR:
        return request.size
    if request.COMMAND.name in profile.empty_reply:
        return 0
    return payload_size(response_class(request.COMMAND), profile)


def decode_reply(command: Command, payload, profile: Profile | None = None) -> Message:
    """The reply to ``command`` decoded from ``payload`` (its length already checked against
    :func:`reply_payload_size`): an :class:`EmptyReply` for commands answered empty."""
    if command.name in (profile or LATEST).empty_reply:
        return EmptyReply(command)
    return decode(response_class(command), payload, profile)
