"""Exceptions of the sans-IO layer, as h11 has them.

Every error is a :class:`ProtocolError`.  Which side is to blame decides the subclass:

* :class:`LocalProtocolError` -- this side misused the API (a bug in the caller: sending
  before HELLO, a value that does not fit its field, a reply nobody asked for).
* :class:`RemoteProtocolError` -- the peer broke the protocol.  The protocol has no error
  reply: a server that finds a request it cannot accept logs why and closes the connection
  (spec/errors.md).  The subclasses say what was wrong; :class:`PeerClosed` is the peer
  ending the connection where the protocol does not allow it.
"""

__all__ = [
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "MalformedMessage",
    "UnknownCommand", "OversizeMessage", "HandshakeError", "PeerClosed", "TruncatedMessage",
]


class ProtocolError(Exception):
    """Base of every error of the protocol core; the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class MalformedMessage(RemoteProtocolError):
    """A message's bytes do not decode (wrong length, counts that do not add up)."""


class UnknownCommand(RemoteProtocolError):
    """A request names a command number this protocol version does not have."""


class OversizeMessage(RemoteProtocolError):
    """A length prefix exceeds what this side is willing to receive."""


class HandshakeError(RemoteProtocolError):
    """HELLO missing, repeated, malformed, or announcing an incompatible version."""


class PeerClosed(RemoteProtocolError):
    """The peer ended the connection while something was still due (replies, payload bytes)."""


class TruncatedMessage(PeerClosed, MalformedMessage):
    """The peer ended the connection in the middle of a message."""
