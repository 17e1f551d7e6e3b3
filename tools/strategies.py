"""Hypothesis strategies for every message of protocol 7.0.0 (valid encodings).

Used by the codec round-trip tests and, as building blocks, by the fuzz campaigns.
"""

from __future__ import annotations

from hypothesis import strategies as st

from refimpl.protocol import messages as m
from refimpl.protocol.constants import CONN_CAPS_SIZE, MAX_NAME, MAX_OP_PARAMS, MAX_SRC

u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def rpc_tensors(draw, type_=u32, ne=st.tuples(u32, u32, u32, u32)):
    """Any encodable rpc_tensor (not necessarily a valid one)."""
    return m.RpcTensor(
        id=draw(u64), type=draw(type_), buffer=draw(u64), ne=draw(ne),
        nb=draw(st.tuples(u32, u32, u32, u32)), op=draw(u32),
        op_params=tuple(draw(st.lists(i32, min_size=MAX_OP_PARAMS // 4,
                                      max_size=MAX_OP_PARAMS // 4))),
        flags=draw(i32), src=tuple(draw(st.lists(u64, min_size=MAX_SRC, max_size=MAX_SRC))),
        view_src=draw(u64), view_offs=draw(u64), data=draw(u64),
        name=draw(st.binary(max_size=MAX_NAME)).ljust(MAX_NAME, b"\0"),
        use_count=draw(i32))


caps = st.binary(min_size=CONN_CAPS_SIZE, max_size=CONN_CAPS_SIZE)


def _graph(draw_tensors):
    return st.builds(
        lambda dev, nodes, tensors: m.GraphComputeRequest.from_tensors(dev, nodes, tensors),
        u32, st.lists(u64, max_size=8), st.lists(draw_tensors, max_size=4))


#: One strategy per request class.
REQUEST_STRATEGIES = {
    m.HelloRequest: st.builds(m.HelloRequest, caps),
    m.DeviceCountRequest: st.just(m.DeviceCountRequest()),
    m.AllocBufferRequest: st.builds(m.AllocBufferRequest, u32, u64),
    m.GetAlignmentRequest: st.builds(m.GetAlignmentRequest, u32),
    m.GetMaxSizeRequest: st.builds(m.GetMaxSizeRequest, u32),
    m.BufferGetBaseRequest: st.builds(m.BufferGetBaseRequest, u64),
    m.FreeBufferRequest: st.builds(m.FreeBufferRequest, u64),
    m.BufferClearRequest: st.builds(m.BufferClearRequest, u64, u8),
    m.SetTensorRequest: st.builds(m.SetTensorRequest, rpc_tensors(), u64,
                                  st.binary(max_size=256), st.integers(0, 1)),
    m.SetTensorHashRequest: st.builds(m.SetTensorHashRequest, rpc_tensors(), u64, u64),
    m.GetTensorRequest: st.builds(m.GetTensorRequest, rpc_tensors(), u64, u64),
    m.CopyTensorRequest: st.builds(m.CopyTensorRequest, rpc_tensors(), rpc_tensors()),
    m.GraphComputeRequest: _graph(rpc_tensors()),
    m.GetDeviceMemoryRequest: st.builds(m.GetDeviceMemoryRequest, u32),
    m.InitTensorRequest: st.builds(m.InitTensorRequest, rpc_tensors()),
    m.GetAllocSizeRequest: st.builds(
        m.GetAllocSizeRequest, u32, rpc_tensors(),
        st.lists(rpc_tensors(), min_size=MAX_SRC, max_size=MAX_SRC).map(tuple)),
    m.GraphRecomputeRequest: st.builds(m.GraphRecomputeRequest, u32),
    m.MemsetTensorRequest: st.builds(m.MemsetTensorRequest, rpc_tensors(), u64, u64, u8),
}

#: One strategy per response class.
RESPONSE_STRATEGIES = {
    m.HelloResponse: st.builds(m.HelloResponse, u8, u8, u8, u8, caps),
    m.DeviceCountResponse: st.builds(m.DeviceCountResponse, u32),
    m.AllocBufferResponse: st.builds(m.AllocBufferResponse, u64, u64),
    m.GetAlignmentResponse: st.builds(m.GetAlignmentResponse, u64),
    m.GetMaxSizeResponse: st.builds(m.GetMaxSizeResponse, u64),
    m.BufferGetBaseResponse: st.builds(m.BufferGetBaseResponse, u64),
    m.SetTensorHashResponse: st.builds(m.SetTensorHashResponse, u8),
    m.GetTensorResponse: st.builds(m.GetTensorResponse, st.binary(max_size=256)),
    m.CopyTensorResponse: st.builds(m.CopyTensorResponse, u8),
    m.GetDeviceMemoryResponse: st.builds(m.GetDeviceMemoryResponse, u64, u64),
    m.GetAllocSizeResponse: st.builds(m.GetAllocSizeResponse, u64),
}

#: Any request.
requests = st.one_of(*REQUEST_STRATEGIES.values())
