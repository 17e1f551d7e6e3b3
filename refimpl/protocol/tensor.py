"""The ``rpc_tensor`` structure (spec/tensor.md) and the stateless checks on it.

A tensor on the wire describes a ggml tensor: element type, shape ``ne`` and byte strides
``nb`` (four dimensions, innermost first), where its bytes live (``buffer`` handle and ``data``
address, both values the server chose), and, inside graphs, the op that produces it and its
sources (``src``/``view_src`` refer to other tensors by their client-chosen ``id``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import MAX_DIMS, MAX_NAME, MAX_OP_PARAMS, MAX_SRC
from .ggml_types import TYPE_COUNT, TypeTraits, type_traits
from .layout import Layout

__all__ = ["RPC_TENSOR", "RPC_TENSOR_SIZE", "RpcTensor", "tensor_nbytes", "tensor_nbytes_of",
           "tensor_problem", "contiguous_strides"]

RPC_TENSOR = Layout(
    "rpc_tensor",
    [
        ("id", "u64"),
        ("type", "u32"),
        ("buffer", "u64"),
        ("ne", "u32", MAX_DIMS),
        ("nb", "u32", MAX_DIMS),
        ("op", "u32"),
        ("op_params", "i32", MAX_OP_PARAMS // 4),
        ("flags", "i32"),
        ("src", "u64", MAX_SRC),
        ("view_src", "u64"),
        ("view_offs", "u64"),
        ("data", "u64"),
        ("name", "char", MAX_NAME),
        ("use_count", "i32"),
    ],
)

#: Size of one encoded ``rpc_tensor`` (296 bytes in protocol 7.0.0).
RPC_TENSOR_SIZE = RPC_TENSOR.size

_ZERO_PARAMS = (0,) * (MAX_OP_PARAMS // 4)
_ZERO_SRC = (0,) * MAX_SRC


@dataclass(frozen=True, slots=True)
class RpcTensor:
    """A decoded ``rpc_tensor``.  All fields are plain ints (``name`` is the raw 64-byte field)."""

    id: int = 0
    type: int = 0
    buffer: int = 0
    ne: tuple = (1, 1, 1, 1)
    nb: tuple = (0, 0, 0, 0)
    op: int = 0
    op_params: tuple = _ZERO_PARAMS
    flags: int = 0
    src: tuple = _ZERO_SRC
    view_src: int = 0
    view_offs: int = 0
    data: int = 0
    name: bytes = field(default=bytes(MAX_NAME))
    use_count: int = 0

    def __post_init__(self):
        # The wire field is exactly 64 bytes: keep the raw field, NUL-padded, so that
        # decode(encode(t)) == t for any name given.
        if len(self.name) != MAX_NAME:
            object.__setattr__(self, "name", bytes(self.name)[:MAX_NAME].ljust(MAX_NAME, b"\0"))

    # -- codec -------------------------------------------------------------------------------
    @classmethod
    def decode(cls, data, offset: int = 0) -> "RpcTensor":
        """Decode one tensor from ``data`` at ``offset`` (needs RPC_TENSOR_SIZE bytes)."""
        return cls(**RPC_TENSOR.unpack(data, offset))

    def encode(self) -> bytes:
        """Encode to exactly RPC_TENSOR_SIZE bytes (``name`` is NUL-padded or truncated)."""
        values = {f.name: getattr(self, f.name) for f in RPC_TENSOR.fields}
        values["name"] = self.name
        return RPC_TENSOR.pack(values)

    @classmethod
    def from_record(cls, rec) -> "RpcTensor":
        """Build from one record of a numpy array with dtype ``RPC_TENSOR.dtype``."""
        return cls(
            id=int(rec["id"]), type=int(rec["type"]), buffer=int(rec["buffer"]),
            ne=tuple(int(x) for x in rec["ne"]), nb=tuple(int(x) for x in rec["nb"]),
            op=int(rec["op"]), op_params=tuple(int(x) for x in rec["op_params"]),
            flags=int(rec["flags"]), src=tuple(int(x) for x in rec["src"]),
            view_src=int(rec["view_src"]), view_offs=int(rec["view_offs"]),
            data=int(rec["data"]), name=bytes(rec["name"]), use_count=int(rec["use_count"]),
        )

    # -- helpers -----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The tensor's name as text (up to the first NUL), for logs and traces."""
        return bytes(self.name).split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def is_null(self) -> bool:
        """True for the all-zero encoding a client sends for "no tensor" (id 0)."""
        return self.id == 0


def tensor_nbytes(type_number: int, ne, nb, traits: TypeTraits | None = None) -> int:
    """Bytes spanned by a tensor, computed exactly as ggml's ``ggml_nbytes`` (spec/tensor.md).

    The result is an exact Python integer: no 64-bit wrap-around can hide an out-of-bounds
    region.  Returns 0 when any dimension is 0.  The type must be valid; a caller that has
    looked up its ``traits`` already may pass them.
    """
    if traits is None:
        traits = type_traits(type_number)
        if traits is None:
            raise ValueError(f"invalid type {type_number}")
    if min(ne) <= 0:
        return 0
    if traits.block_size == 1:
        total = traits.type_size
        for n, stride in zip(ne, nb):
            total += (n - 1) * stride
        return total
    total = ne[0] * nb[0] // traits.block_size
    for n, stride in zip(ne[1:], nb[1:]):
        total += (n - 1) * stride
    return total


def tensor_problem(t: RpcTensor) -> str | None:
    """Stateless validity of a tensor description (spec/tensor.md, "Validity").

    Returns None for a valid tensor, else a sentence saying what is wrong.  The stateful
    checks (is the buffer handle live, do the bytes lie inside it) belong to the server.
    """
    return tensor_problem_of(t.type, t.ne)


def tensor_problem_of(type_number: int, ne) -> str | None:
    """:func:`tensor_problem` of a tensor given by its type number and shape alone."""
    if type_number >= TYPE_COUNT:
        return f"type {type_number} is out of range (types are < {TYPE_COUNT})"
    traits = type_traits(type_number)
    if traits is None:
        return f"type {type_number} is a removed or unused ggml type"
    if ne[0] % traits.block_size != 0:
        return (f"ne[0]={ne[0]} is not a multiple of the {traits.name} block size "
                f"{traits.block_size}")
    return None


def tensor_nbytes_of(t: RpcTensor) -> int:
    """:func:`tensor_nbytes` of a decoded tensor (the tensor must pass :func:`tensor_problem`)."""
    return tensor_nbytes(t.type, t.ne, t.nb)


def contiguous_strides(type_number: int, ne) -> tuple[int, int, int, int]:
    """Byte strides ``nb`` of a contiguous tensor of this type and shape (as ggml lays it out)."""
    traits = type_traits(type_number)
    if traits is None:
        raise ValueError(f"invalid type {type_number}")
    nb0 = traits.type_size
    nb1 = nb0 * (ne[0] // traits.block_size)
    nb2 = nb1 * ne[1]
    nb3 = nb2 * ne[2]
    return (nb0, nb1, nb2, nb3)
