"""Sans-IO core of the ggml RPC protocol, version 7.0.0 (spec/).

Nothing here touches a socket, and nothing here needs more than the standard library and
numpy.  Read it top-down: numbers (:mod:`.constants`, :mod:`.ggml_types`), byte layouts
(:mod:`.layout`, :mod:`.tensor`), the 7.0.0 messages (:mod:`.messages`), older versions as a
layer over them (:mod:`.profiles`, :mod:`.compat`), and the connection state machines of
both ends (:mod:`.connection`).  Errors: :mod:`.errors`.
"""

from .connection import (NEED_DATA, ClientConnection, ConnectionClosed, GetTensorStart,
                         ServerConnection, SetTensorStart, State, hello_request, hello_response)
from .constants import (COMMAND_LIMIT, CONN_CAPS_SIZE, HASH_THRESHOLD, PROTOCOL_VERSION,
                        Command)
from .errors import (HandshakeError, LocalProtocolError, MalformedMessage, OversizeMessage,
                     PeerClosed, ProtocolError, RemoteProtocolError, TruncatedMessage,
                     UnknownCommand)
from .fnv import fnv1a_64_reference
from .ggml_types import GgmlType, type_name, type_traits
from .messages import *  # noqa: F401,F403  (every 7.0.0 message class, REQUESTS, RESPONSES)
from .messages import __all__ as _messages_all
from .compat import (EmptyReply, GraphComputeResponse, decode, encode,  # noqa: E402
                     has_response)  # noqa: F401  (after messages' *: compat's takes a profile)
from .profiles import LATEST, PROFILES, Profile, profile
from .tensor import RPC_TENSOR, RPC_TENSOR_SIZE, RpcTensor, tensor_nbytes, tensor_problem

__all__ = [
    # connections and their events
    "ClientConnection", "ServerConnection", "State", "NEED_DATA", "ConnectionClosed",
    "SetTensorStart", "GetTensorStart", "hello_request", "hello_response",
    # numbers
    "PROTOCOL_VERSION", "Command", "COMMAND_LIMIT", "CONN_CAPS_SIZE", "HASH_THRESHOLD",
    "GgmlType", "type_name", "type_traits",
    # tensors
    "RpcTensor", "RPC_TENSOR", "RPC_TENSOR_SIZE", "tensor_nbytes", "tensor_problem",
    # versions
    "Profile", "PROFILES", "LATEST", "profile", "EmptyReply", "GraphComputeResponse", "encode",
    "decode",
    # errors
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "MalformedMessage",
    "UnknownCommand", "OversizeMessage", "HandshakeError", "PeerClosed", "TruncatedMessage",
    # the content hash
    "fnv1a_64_reference",
    *_messages_all,  # has_response among them: compat's, which takes a profile
]
