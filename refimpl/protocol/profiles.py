"""Protocol versions 3.0.0 … 7.0.0 as data (spec/versions.md).

A :class:`Profile` says everything that tells one protocol version apart from another on the
wire: the HELLO shape, the ``rpc_tensor`` variant, fixed request sizes that changed, which
command numbers exist, which commands are answered (and which with an empty reply), and which
op table numbers ``rpc_tensor.op``.  The op tables themselves are data read from the real
``ggml.h`` of each version (``op_tables.json``: product data, written by the repository's
tool ``python -m tools.op_tables``).

The connections (:mod:`.connection`), the per-profile codecs (:mod:`.compat`), the server
(``refimpl-server --protocol``), the graph engine (its wire → op mapping) and the client take a profile; :data:`LATEST` (7.0.0) is the default, and
``tests/test_profiles.py`` holds it equal to :mod:`.constants` and :mod:`refimpl.graph.ops`.
:data:`SERVED` lists the versions that can be selected.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .constants import Command

__all__ = ["Version", "Profile", "PROFILES", "LATEST", "SERVED", "profile", "served_profile",
           "op_tables"]

Version = tuple[int, int, int]

_OP_TABLES = Path(__file__).with_name("op_tables.json")

def _commands(last: str) -> Mapping[str, int]:
    """Name → number of every command up to ``last``.  No command was ever renumbered from
    1.0.0 on; versions differ only in how many of :class:`.constants.Command` exist."""
    return MappingProxyType({c.name: int(c) for c in Command if c <= Command[last]})


@functools.cache
def op_tables() -> Mapping[str, Mapping[str, Mapping[str, int]]]:
    """{table key: {"ops" | "unary" | "glu": {name: number}}} from op_tables.json."""
    raw = json.loads(_OP_TABLES.read_text())
    return MappingProxyType({v: MappingProxyType({k: MappingProxyType(t[k]) for k in ("ops", "unary", "glu")})
                             for v, t in raw.items()})


@dataclass(frozen=True)
class Profile:
    """One protocol version, as it differs on the wire from the others."""

    version: Version
    #: HELLO payload sizes: request (0, or the 24-byte capability block from 4.0.0) and reply
    #: (3: major, minor, patch; 28 from 4.0.0: those, a padding byte and the block).
    hello_request_size: int
    hello_response_size: int
    #: The last 4 bytes of ``rpc_tensor``: ``"padding"`` (zero, ignored) or ``"use_count"``
    #: (5.1.0 on: the node's consumer count in graphs, 0 elsewhere).  296 bytes either way.
    rpc_tensor_tail: str
    #: Fixed part of SET_TENSOR: rpc_tensor + offset (304), or rpc_tensor + cache flag +
    #: offset (305, 7.0.0).
    set_tensor_header_size: int
    #: GET_ALLOC_SIZE request: device + tensor (300), or device + tensor + its 10 sources
    #: (3260, 3.6.0 on).
    get_alloc_size_request_size: int
    #: Command name → number of every command a server of this version accepts.
    commands: Mapping[str, int]
    #: Commands the server never answers.
    no_reply: frozenset[str]
    #: Commands answered with a reply of length 0 (only the 8-byte size).
    empty_reply: frozenset[str]
    #: Key of the op table in op_tables.json (None: none known).  Where the version did not
    #: fix one (3.0.0, 3.6.0), the default of :attr:`op_table_choices`.
    op_table: str | None
    #: How this profile is known: "release" (read in a llama-cpp-python sdist), "ggml"
    #: (read in the ggml repository's history, no release carries it) or "inferred".
    source: str
    #: llama-cpp-python releases that vendor this version (spec/versions.md).
    releases: tuple[str, ...] = ()
    #: The op tables builds of this version used, when there was more than one (keys of
    #: op_tables.json, by op count: ``"3.0.0-90"``); a server must be told its clients'.
    op_table_choices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "%d.%d.%d" % self.version

    def with_op_table(self, key: str) -> "Profile":
        """This version with another of its :attr:`op_table_choices` (ValueError otherwise)."""
        if key == self.op_table:
            return self
        if key not in self.op_table_choices:
            raise ValueError(f"protocol {self.name} has no op table {key!r}; its builds used "
                             + (", ".join(self.op_table_choices) or f"only {self.op_table}"))
        return dataclasses.replace(self, op_table=key)

    def with_op_count(self, count: int) -> "Profile":
        """This version with the op table of its builds that had ``count`` ops (the keys of
        :attr:`op_table_choices` end in their op count); ValueError if none had."""
        if count == self.op_count:
            return self
        key = next((k for k in self.op_table_choices if k.endswith(f"-{count}")), None)
        if key is None:
            if not self.op_table_choices:
                raise ValueError(f"protocol {self.name} fixes the op count at {self.op_count}")
            raise ValueError(f"no build of protocol {self.name} had {count} ops; they had "
                             + ", ".join(k.rsplit("-", 1)[1] for k in self.op_table_choices))
        return self.with_op_table(key)

    @property
    def peer_release(self) -> str | None:
        """The release whose llama.cpp the tests run as this version's real peer: the newest
        one that carries it (None: no release does)."""
        return self.releases[-1] if self.releases else None

    @property
    def op_count(self) -> int | None:
        """GGML_OP_COUNT of the op table in use."""
        return None if self.ops is None else len(self.ops)

    @property
    def command_limit(self) -> int:
        """Every command number at or above this is unknown."""
        return max(self.commands.values()) + 1

    def _table(self, kind: str) -> Mapping[str, int] | None:
        return None if self.op_table is None else op_tables()[self.op_table][kind]

    @property
    def ops(self) -> Mapping[str, int] | None:
        """``enum ggml_op``: name → number (None: not fixed by this version)."""
        return self._table("ops")

    @property
    def unary_ops(self) -> Mapping[str, int] | None:
        return self._table("unary")

    @property
    def glu_ops(self) -> Mapping[str, int] | None:
        return self._table("glu")


_V3_EMPTY = frozenset({"FREE_BUFFER", "BUFFER_CLEAR", "INIT_TENSOR"})
_V35_NO_REPLY = frozenset({"SET_TENSOR", "GRAPH_COMPUTE", "GRAPH_RECOMPUTE"})
_V6_NO_REPLY = _V35_NO_REPLY | {"FREE_BUFFER", "BUFFER_CLEAR", "INIT_TENSOR", "MEMSET_TENSOR"}


def _p(version, *, hello=(0, 3), tail="padding", set_tensor=304, alloc_size=3260,
       last="GRAPH_RECOMPUTE", no_reply=_V35_NO_REPLY, empty=_V3_EMPTY, ops=None,
       source="release", releases=(), choices=()):
    return Profile(version=version, hello_request_size=hello[0], hello_response_size=hello[1],
                   rpc_tensor_tail=tail, set_tensor_header_size=set_tensor,
                   get_alloc_size_request_size=alloc_size, commands=_commands(last),
                   no_reply=frozenset(no_reply), empty_reply=frozenset(empty),
                   op_table=ops,
                   source=source, releases=tuple(releases), op_table_choices=tuple(choices))


_V4_HELLO = (24, 28)
_V5_EMPTY = _V3_EMPTY | {"MEMSET_TENSOR"}

#: Every supported version, oldest first.
PROFILES: Mapping[Version, Profile] = MappingProxyType({p.version: p for p in (
    # 3.0.0 and 3.6.0 builds used several op tables; the default is the one in use longest
    # while the version was current (spec/versions.md, "Before 3.6.1").
    _p((3, 0, 0), alloc_size=300, last="DEVICE_COUNT", no_reply={"SET_TENSOR"}, source="ggml",
       ops="3.0.0-90", choices=("3.0.0-90", "3.0.0-94", "3.0.0-95")),
    _p((3, 5, 0), alloc_size=300, ops="3.5.0", source="ggml"),
    _p((3, 6, 0), source="ggml", ops="3.6.0-95", choices=("3.6.0-95", "3.6.0-96")),
    _p((3, 6, 1), ops="3.6.1", releases=("0.3.17", "0.3.18", "0.3.19", "0.3.20")),
    _p((4, 0, 0), hello=_V4_HELLO, ops="4.0.0",
       releases=tuple(f"0.3.{n}" for n in range(21, 29))),
    _p((4, 0, 1), hello=_V4_HELLO, ops="4.0.1",
       releases=tuple(f"0.3.{n}" for n in range(29, 34))),
    _p((4, 0, 2), hello=_V4_HELLO, ops="4.0.2", releases=("0.3.34",)),
    _p((4, 0, 3), hello=_V4_HELLO, ops="4.0.3", source="ggml"),
    _p((5, 0, 0), hello=_V4_HELLO, last="MEMSET_TENSOR", empty=_V5_EMPTY, ops="5.0.0",
       releases=("0.3.35",)),
    _p((5, 1, 0), hello=_V4_HELLO, tail="use_count", last="MEMSET_TENSOR", empty=_V5_EMPTY,
       ops="5.1.0", source="ggml"),
    _p((6, 0, 0), hello=_V4_HELLO, tail="use_count", last="MEMSET_TENSOR",
       no_reply=_V6_NO_REPLY, empty=(), ops="7.0.0", source="inferred"),
    _p((7, 0, 0), hello=_V4_HELLO, tail="use_count", set_tensor=305, last="MEMSET_TENSOR",
       no_reply=_V6_NO_REPLY, empty=(), ops="7.0.0", releases=("0.3.36",)),
)})

#: The newest version: what refimpl speaks by default.
LATEST: Profile = PROFILES[max(PROFILES)]

#: The versions refimpl serves and speaks (``refimpl-server --protocol``): every version
#: known from real sources, a release's or the ggml repository's history, with its op
#: table(s) read from ``ggml.h`` there.  (6.0.0, known only by inference, is not served.)
SERVED: Mapping[Version, Profile] = MappingProxyType({
    v: p for v, p in PROFILES.items() if p.source in ("release", "ggml") and p.op_table is not None})


def served_profile(version: str | Version) -> Profile:
    """The profile of a served version; KeyError names the served ones."""
    p = profile(version)
    if p.version not in SERVED:
        raise KeyError(f"protocol version {p.name} is not served by refimpl; served: "
                       + ", ".join(q.name for q in SERVED.values()))
    return p


def profile(version: str | Version) -> Profile:
    """The profile of ``"X.Y.Z"`` or ``(X, Y, Z)``; KeyError names the supported ones."""
    key = tuple(int(x) for x in version.split(".")) if isinstance(version, str) else tuple(version)
    try:
        return PROFILES[key]
    except KeyError:
        raise KeyError(f"unsupported protocol version {version}; supported: "
                       + ", ".join(p.name for p in PROFILES.values())) from None
