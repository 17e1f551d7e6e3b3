"""Exceptions of the sans-IO layer.

The protocol has no error reply: a server that finds a request it cannot accept logs why and
closes the connection (spec/errors.md).  These exceptions carry the "why".
"""


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


class MalformedMessage(ProtocolError):
    """A message's bytes do not decode (wrong length, counts that do not add up)."""


class UnknownCommand(ProtocolError):
    """A request names a command number this protocol version does not have."""


class OversizeMessage(ProtocolError):
    """A length prefix exceeds what this side is willing to receive."""


class HandshakeError(ProtocolError):
    """HELLO missing, repeated, malformed, or announcing an incompatible version."""


class LocalProtocolError(Exception):
    """This side tried to do something the protocol forbids (a bug in the caller)."""
