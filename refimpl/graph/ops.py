"""ggml's operation numbers as protocol 7.0.0 carries them in ``rpc_tensor.op`` (spec/graph-ops.md).

These are the values of ``enum ggml_op`` (and of the unary and GLU sub-enums carried in op
parameters) in llama.cpp b11312, the build vendored by llama-cpp-python 0.3.36.  ggml inserts
new ops in the middle of its enum, so the numbers belong to this protocol version only
(spec/versions.md, "Op numbering"); ``tests/test_peer_sources.py`` checks them against the
peer's header.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Mapping


class Op(enum.IntEnum):
    """``enum ggml_op`` of protocol 7.0.0."""

    NONE = 0
    DUP = 1
    ADD = 2
    ADD_ID = 3
    ADD1 = 4
    ACC = 5
    SUB = 6
    MUL = 7
    DIV = 8
    SQR = 9
    SQRT = 10
    LOG = 11
    SIN = 12
    COS = 13
    SUM = 14
    SUM_ROWS = 15
    CUMSUM = 16
    MEAN = 17
    ARGMAX = 18
    COUNT_EQUAL = 19
    REPEAT = 20
    REPEAT_BACK = 21
    CONCAT = 22
    SILU_BACK = 23
    NORM = 24
    RMS_NORM = 25
    RMS_NORM_BACK = 26
    GROUP_NORM = 27
    L2_NORM = 28
    MUL_MAT = 29
    MUL_MAT_ID = 30
    OUT_PROD = 31
    SCALE = 32
    SET = 33
    CPY = 34
    CONT = 35
    RESHAPE = 36
    VIEW = 37
    PERMUTE = 38
    TRANSPOSE = 39
    GET_ROWS = 40
    GET_ROWS_BACK = 41
    SET_ROWS = 42
    DIAG = 43
    DIAG_MASK_INF = 44
    DIAG_MASK_ZERO = 45
    SOFT_MAX = 46
    SOFT_MAX_BACK = 47
    ROPE = 48
    ROPE_BACK = 49
    CLAMP = 50
    CONV_TRANSPOSE_1D = 51
    IM2COL = 52
    IM2COL_BACK = 53
    IM2COL_3D = 54
    COL2IM_1D = 55
    CONV_2D = 56
    CONV_3D = 57
    CONV_2D_DW = 58
    CONV_TRANSPOSE_2D = 59
    POOL_1D = 60
    POOL_2D = 61
    POOL_2D_BACK = 62
    UPSCALE = 63
    PAD = 64
    PAD_REFLECT_1D = 65
    ROLL = 66
    ARANGE = 67
    TIMESTEP_EMBEDDING = 68
    ARGSORT = 69
    TOP_K = 70
    LEAKY_RELU = 71
    TRI = 72
    FILL = 73
    FLASH_ATTN_EXT = 74
    FLASH_ATTN_BACK = 75
    SSM_CONV = 76
    SSM_SCAN = 77
    WIN_PART = 78
    WIN_UNPART = 79
    GET_REL_POS = 80
    ADD_REL_POS = 81
    RWKV_WKV6 = 82
    GATED_LINEAR_ATTN = 83
    RWKV_WKV7 = 84
    SOLVE_TRI = 85
    GATED_DELTA_NET = 86
    LIGHTNING_INDEXER = 87
    DSV4_HC_COMB = 88
    DSV4_HC_PRE = 89
    DSV4_HC_POST = 90
    UNARY = 91
    MAP_CUSTOM1 = 92
    MAP_CUSTOM2 = 93
    MAP_CUSTOM3 = 94
    CUSTOM = 95
    CROSS_ENTROPY_LOSS = 96
    CROSS_ENTROPY_LOSS_BACK = 97
    OPT_STEP_ADAMW = 98
    OPT_STEP_SGD = 99
    GLU = 100


#: ``GGML_OP_COUNT``: every ``op`` value at or above it is unknown.
OP_COUNT = 101


class UnaryOp(enum.IntEnum):
    """``enum ggml_unary_op`` (``op_params[0]`` of a UNARY node)."""

    ABS = 0
    SGN = 1
    NEG = 2
    STEP = 3
    TANH = 4
    ELU = 5
    RELU = 6
    SIGMOID = 7
    GELU = 8
    GELU_QUICK = 9
    SILU = 10
    HARDSWISH = 11
    HARDSIGMOID = 12
    EXP = 13
    EXPM1 = 14
    SOFTPLUS = 15
    GELU_ERF = 16
    XIELU = 17
    FLOOR = 18
    CEIL = 19
    ROUND = 20
    TRUNC = 21


class GluOp(enum.IntEnum):
    """``enum ggml_glu_op`` (``op_params[0]`` of a GLU node)."""

    REGLU = 0
    GEGLU = 1
    SWIGLU = 2
    SWIGLU_OAI = 3
    GEGLU_ERF = 4
    GEGLU_QUICK = 5
    SWIGLU_CLAMP = 6


#: Ops that compute nothing: their result is a new description of existing bytes.
VIEW_OPS = frozenset({Op.NONE, Op.VIEW, Op.RESHAPE, Op.PERMUTE, Op.TRANSPOSE})

#: Ops whose parameters carry a function pointer of the client's process.  A server can
#: never run them; they are refused outright (spec/graph.md).
FUNCTION_POINTER_OPS = frozenset({Op.MAP_CUSTOM1, Op.MAP_CUSTOM2, Op.MAP_CUSTOM3, Op.CUSTOM})


@dataclass(frozen=True)
class WireOps:
    """How one protocol version numbers ops on the wire, as maps to this module's enums.

    ``ops[n]`` is the :class:`Op` that wire number ``n`` names (-1: an op this package does
    not know), likewise ``unary`` and ``glu`` for the sub-op in ``op_params[0]``.
    """

    version: str
    ops: tuple[int, ...]
    unary: tuple[int, ...]
    glu: tuple[int, ...]


def _table(wire: Mapping[str, int], enum_cls) -> tuple[int, ...]:
    out = [-1] * (max(wire.values()) + 1 if wire else 0)
    for name, number in wire.items():
        member = enum_cls.__members__.get(name)
        out[number] = int(member) if member is not None else -1
    return tuple(out)


def wire_ops(profile) -> WireOps | None:
    """The wire → op maps of ``profile`` (a :class:`refimpl.protocol.profiles.Profile`);
    None where the wire numbers are this module's own (7.0.0) and nothing needs mapping."""
    if profile.op_table is None:
        raise ValueError(f"protocol {profile.name} does not fix an op table")
    return _wire_ops(profile.op_table)


@functools.cache
def _wire_ops(table: str) -> WireOps | None:
    from ..protocol.profiles import op_tables
    t = op_tables()[table]
    maps = WireOps(table, _table(t["ops"], Op), _table(t["unary"], UnaryOp),
                   _table(t["glu"], GluOp))
    if maps.ops == tuple(range(OP_COUNT)) and maps.unary == tuple(range(len(UnaryOp))) and \
            maps.glu == tuple(range(len(GluOp))):
        return None
    return maps


def wire_number(profile, op: Op) -> int | None:
    """The number ``profile`` gives ``op`` on the wire (None: the version lacks the op)."""
    return profile.ops.get(Op(op).name)


def op_name(number: int) -> str:
    """A printable name for any op number."""
    try:
        return Op(number).name
    except ValueError:
        return f"unknown-op-{number}"
