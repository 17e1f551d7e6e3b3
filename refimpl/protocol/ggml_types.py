"""ggml tensor element types as they appear in ``rpc_tensor.type`` (spec/tensor.md, "Types").

A type is a block format: ``block_size`` elements are stored in ``type_size`` bytes.  Plain
types (F32, F16, I32, ...) have a block size of 1.  Numbers of types that ggml removed stay
reserved forever; a tensor naming one of them is invalid.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["GgmlType", "TYPE_COUNT", "REMOVED_TYPES", "TypeTraits", "type_traits", "type_name"]


class GgmlType(enum.IntEnum):
    """ggml's ``enum ggml_type`` for protocol 7.0.0 (llama.cpp as vendored by llama-cpp-python 0.3.36)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


#: One past the largest type number; ``type >= TYPE_COUNT`` is always invalid.
TYPE_COUNT = 43

#: Numbers ggml once used and removed (Q4_2, Q4_3, the Q4_0_x_y and IQ4_NL_x_y repacked types).
REMOVED_TYPES = frozenset({4, 5, 31, 32, 33, 36, 37, 38})


@dataclass(frozen=True)
class TypeTraits:
    """Storage geometry of one type: ``block_size`` elements occupy ``type_size`` bytes."""

    name: str
    block_size: int
    type_size: int

    @property
    def is_quantized(self) -> bool:
        """True for block formats (more than one element per block), as ggml counts them."""
        return self.block_size > 1


_TRAITS: dict[int, TypeTraits] = {
    GgmlType.F32: TypeTraits("f32", 1, 4),
    GgmlType.F16: TypeTraits("f16", 1, 2),
    GgmlType.Q4_0: TypeTraits("q4_0", 32, 18),
    GgmlType.Q4_1: TypeTraits("q4_1", 32, 20),
    GgmlType.Q5_0: TypeTraits("q5_0", 32, 22),
    GgmlType.Q5_1: TypeTraits("q5_1", 32, 24),
    GgmlType.Q8_0: TypeTraits("q8_0", 32, 34),
    GgmlType.Q8_1: TypeTraits("q8_1", 32, 36),
    GgmlType.Q2_K: TypeTraits("q2_K", 256, 84),
    GgmlType.Q3_K: TypeTraits("q3_K", 256, 110),
    GgmlType.Q4_K: TypeTraits("q4_K", 256, 144),
    GgmlType.Q5_K: TypeTraits("q5_K", 256, 176),
    GgmlType.Q6_K: TypeTraits("q6_K", 256, 210),
    GgmlType.Q8_K: TypeTraits("q8_K", 256, 292),
    GgmlType.IQ2_XXS: TypeTraits("iq2_xxs", 256, 66),
    GgmlType.IQ2_XS: TypeTraits("iq2_xs", 256, 74),
    GgmlType.IQ3_XXS: TypeTraits("iq3_xxs", 256, 98),
    GgmlType.IQ1_S: TypeTraits("iq1_s", 256, 50),
    GgmlType.IQ4_NL: TypeTraits("iq4_nl", 32, 18),
    GgmlType.IQ3_S: TypeTraits("iq3_s", 256, 110),
    GgmlType.IQ2_S: TypeTraits("iq2_s", 256, 82),
    GgmlType.IQ4_XS: TypeTraits("iq4_xs", 256, 136),
    GgmlType.I8: TypeTraits("i8", 1, 1),
    GgmlType.I16: TypeTraits("i16", 1, 2),
    GgmlType.I32: TypeTraits("i32", 1, 4),
    GgmlType.I64: TypeTraits("i64", 1, 8),
    GgmlType.F64: TypeTraits("f64", 1, 8),
    GgmlType.IQ1_M: TypeTraits("iq1_m", 256, 56),
    GgmlType.BF16: TypeTraits("bf16", 1, 2),
    GgmlType.TQ1_0: TypeTraits("tq1_0", 256, 54),
    GgmlType.TQ2_0: TypeTraits("tq2_0", 256, 66),
    GgmlType.MXFP4: TypeTraits("mxfp4", 32, 17),
    GgmlType.NVFP4: TypeTraits("nvfp4", 64, 36),
    GgmlType.Q1_0: TypeTraits("q1_0", 128, 18),
    GgmlType.Q2_0: TypeTraits("q2_0", 64, 18),
}


def type_traits(type_number: int) -> TypeTraits | None:
    """Return the traits of a wire type number, or None when the number names no usable type."""
    return _TRAITS.get(type_number)


def type_name(type_number: int) -> str:
    """A printable name for any wire type number, valid or not (for logs and traces)."""
    traits = _TRAITS.get(type_number)
    if traits is not None:
        return traits.name
    if type_number in REMOVED_TYPES:
        return f"removed-type-{type_number}"
    return f"unknown-type-{type_number}"
