"""The ggml type table, tensor byte spans, contiguous strides and FNV-1a."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given
from hypothesis import strategies as st

from refimpl.hashing import fnv1a_64
from refimpl.protocol.fnv import fnv1a_64_reference
from refimpl.protocol.ggml_types import REMOVED_TYPES, TYPE_COUNT, GgmlType, type_traits
from refimpl.protocol.tensor import RpcTensor, contiguous_strides, tensor_nbytes, tensor_problem


#: Where the gguf package on PyPI (0.19) lags the ggml of protocol 7.0.0.  The peer library is
#: the ground truth (tests/test_peer_sources.py checks every type against it): Q8_1's block is
#: two f16 values and 32 quants, 36 bytes.
GGUF_LAGS = {GGMLQuantizationType.Q8_1: (32, 36)}


@pytest.mark.parametrize("q", list(GGMLQuantizationType), ids=lambda q: q.name)
def test_type_table_agrees_with_gguf(q):
    """gguf (the Python package llama.cpp ships) is an independent source for block geometry."""
    traits = type_traits(q.value)
    assert traits is not None, f"{q.name} missing"
    expected = GGUF_LAGS.get(q, GGML_QUANT_SIZES[q])
    assert (traits.block_size, traits.type_size) == expected
    assert GgmlType(q.value).name == q.name


def test_removed_and_out_of_range_types_are_invalid():
    for t in list(REMOVED_TYPES) + [TYPE_COUNT, TYPE_COUNT + 1, 2**32 - 1]:
        assert type_traits(t) is None
        assert tensor_problem(RpcTensor(type=t)) is not None


def test_ne0_must_be_a_block_multiple():
    assert tensor_problem(RpcTensor(type=GgmlType.Q4_0, ne=(32, 1, 1, 1))) is None
    assert "block size" in tensor_problem(RpcTensor(type=GgmlType.Q4_0, ne=(33, 1, 1, 1)))


def numpy_nbytes(t, ne, nb):
    """Independent oracle: byte span of the last element (numpy strided view) plus its size."""
    tr = type_traits(t)
    if min(ne) == 0:
        return 0
    rows = [ne[0] // tr.block_size] + list(ne[1:])
    last = sum((n - 1) * s for n, s in zip(rows, nb))
    return last + tr.type_size


@given(st.sampled_from([GgmlType.F32, GgmlType.F16, GgmlType.Q4_0, GgmlType.Q6_K, GgmlType.I8]),
       st.lists(st.integers(1, 6), min_size=4, max_size=4))
def test_nbytes_of_contiguous_tensors(t, dims):
    tr = type_traits(t)
    ne = (dims[0] * tr.block_size, *dims[1:])
    nb = contiguous_strides(t, ne)
    n_elems = int(np.prod(ne))
    assert tensor_nbytes(t, ne, nb) == n_elems // tr.block_size * tr.type_size
    assert tensor_nbytes(t, ne, nb) == numpy_nbytes(t, ne, nb)


@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
       st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4))
def test_nbytes_never_wraps(ne, nb):
    """Wire values are u32: the span can exceed 2**64, and must be computed exactly."""
    got = tensor_nbytes(GgmlType.F32, ne, nb)
    if min(ne) == 0:
        assert got == 0
    else:
        assert got == 4 + sum((n - 1) * s for n, s in zip(ne, nb))


def test_fnv_known_vectors():
    # Published FNV-1a 64-bit test vectors.
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


@given(st.binary(max_size=2000))
def test_fnv_fast_equals_reference(data):
    assert fnv1a_64(data) == fnv1a_64_reference(data)
    assert fnv1a_64(np.frombuffer(data, np.uint8)) == fnv1a_64_reference(data)
