"""The type tables validation needs: which block formats refimpl computes with, and the
activation format ggml's CPU backend pairs with each weight type (spec/ops/matmul.md)."""

from __future__ import annotations

from ...protocol.ggml_types import GgmlType

F32, F16, BF16 = int(GgmlType.F32), int(GgmlType.F16), int(GgmlType.BF16)
Q4_0, Q4_1 = int(GgmlType.Q4_0), int(GgmlType.Q4_1)
Q5_0, Q5_1 = int(GgmlType.Q5_0), int(GgmlType.Q5_1)
Q8_0, Q8_1, Q8_K = int(GgmlType.Q8_0), int(GgmlType.Q8_1), int(GgmlType.Q8_K)
Q2_K, Q3_K, Q4_K = int(GgmlType.Q2_K), int(GgmlType.Q3_K), int(GgmlType.Q4_K)
Q5_K, Q6_K = int(GgmlType.Q5_K), int(GgmlType.Q6_K)
IQ4_NL, IQ4_XS = int(GgmlType.IQ4_NL), int(GgmlType.IQ4_XS)
MXFP4, NVFP4 = int(GgmlType.MXFP4), int(GgmlType.NVFP4)
TQ1_0, TQ2_0 = int(GgmlType.TQ1_0), int(GgmlType.TQ2_0)
Q1_0, Q2_0 = int(GgmlType.Q1_0), int(GgmlType.Q2_0)
IQ2_XXS, IQ2_XS, IQ2_S = int(GgmlType.IQ2_XXS), int(GgmlType.IQ2_XS), int(GgmlType.IQ2_S)
IQ3_XXS, IQ3_S = int(GgmlType.IQ3_XXS), int(GgmlType.IQ3_S)
IQ1_S, IQ1_M = int(GgmlType.IQ1_S), int(GgmlType.IQ1_M)

#: The codebook formats of refimpl.kernels.quants_grid (IQ1, IQ2, IQ3): read, never written
#: (ggml's CPU backend has no quantiser for them).
GRID_WEIGHT_TYPES = frozenset({IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S})

#: The weight formats of refimpl.kernels.quants_more (non-linear, FP4, ternary, 1/2-bit, and
#: the codebook formats): dequantised exactly, then multiplied with the activations' exact
#: Q8 values.
MORE_WEIGHT_TYPES = frozenset({IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0, TQ2_0, Q1_0,
                               Q2_0}) | GRID_WEIGHT_TYPES

#: Block formats refimpl can dequantise (weights of MUL_MAT and sources of GET_ROWS).
QUANT_WEIGHT_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
                                Q6_K}) | MORE_WEIGHT_TYPES

#: The block formats of a quantised KV cache (``-ctk``/``-ctv``): SET_ROWS writes them and
#: FLASH_ATTN_EXT reads them.
KV_CACHE_TYPES = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL})

#: Block formats refimpl quantises float rows into (SET_ROWS and CPY into a block-format
#: tensor), as ggml's CPU backend's ``from_float`` does.
QUANTIZE_TYPES = KV_CACHE_TYPES | (MORE_WEIGHT_TYPES - GRID_WEIGHT_TYPES)

#: The k-quant weight formats (256-value super-blocks, Q8_K activations).
K_QUANT_TYPES = frozenset({Q2_K, Q3_K, Q4_K, Q5_K, Q6_K})

#: The activation format ggml's CPU backend pairs with each weight type (``vec_dot_type``).
VEC_DOT_TYPE = {F32: F32, F16: F16, BF16: BF16,
                Q4_0: Q8_0, Q5_0: Q8_0, Q8_0: Q8_0,
                Q4_1: Q8_1, Q5_1: Q8_1,
                Q2_K: Q8_K, Q3_K: Q8_K, Q4_K: Q8_K, Q5_K: Q8_K, Q6_K: Q8_K,
                IQ4_NL: Q8_0, MXFP4: Q8_0, NVFP4: Q8_0, Q1_0: Q8_0, Q2_0: Q8_0,
                IQ4_XS: Q8_K, TQ1_0: Q8_K, TQ2_0: Q8_K} | dict.fromkeys(GRID_WEIGHT_TYPES, Q8_K)

