"""Capture file format, the recording proxy and the annotated trace."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import trio

from refimpl.capture.fileformat import (CLIENT_TO_SERVER, MESSAGE, NOTE, OPENED, Capture,
                                        CaptureFormatError, Record, Writer, read)
from refimpl.capture.proxy import CaptureProxy
from refimpl.capture.trace import render
from refimpl.client import RpcClient
from refimpl.protocol import GgmlType
from refimpl.protocol.observer import Observer


@pytest.mark.parametrize("suffix", [".cap", ".cap.gz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    recs = [Record(0, MESSAGE, 0, 5, b"abc"), Record(1, NOTE, 3, 2**40, b"{}")]
    with Writer(path, {"k": 1}) as w:
        for r in recs:
            w.write(r)
    cap = read(path)
    assert cap.meta == {"k": 1} and cap.records == recs
    raw = gzip.decompress(path.read_bytes()) if suffix.endswith("gz") else path.read_bytes()
    assert raw[:8] == b"GGMLRPCC" and struct.unpack_from("<II", raw, 8)[0] == 1
    head = 16 + struct.unpack_from("<I", raw, 12)[0]
    assert struct.unpack_from("<BBHIQQ", raw, head) == (0, 0, 0, 0, 5, 3)


def test_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"not a capture at all")
    with pytest.raises(CaptureFormatError):
        read(tmp_path / "bad")


async def test_proxy_records_and_is_transparent(server, tmp_path):
    path = tmp_path / "s.cap"
    with Writer(path, {"description": "test"}) as w:
        async with trio.open_nursery() as nursery:
            proxy = await nursery.start(CaptureProxy(("127.0.0.1", 0), ("127.0.0.1", server.port), w).serve)
            async with await RpcClient.connect("127.0.0.1", proxy.port) as c:
                buf = await c.alloc_buffer(4096)
                t = buf.tensor(GgmlType.F32, (16,), name="probe")
                x = np.arange(16, dtype=np.float32)
                await c.set_tensor(t, x)
                assert await c.get_tensor(t, 0, 64) == x.tobytes()
            with trio.fail_after(5):
                while proxy.active:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    cap = read(path)
    kinds = [(r.direction, r.kind) for r in cap.records]
    assert kinds[0] == (CLIENT_TO_SERVER, OPENED)
    # Re-parsing the recorded messages gives back the whole conversation in order.
    obs = Observer()
    names = []
    for r in cap.messages():
        parsed = obs.from_client(r.data) if r.direction == CLIENT_TO_SERVER else obs.from_server(r.data)
        names += [("->" if p.direction == 0 else "<-") + type(p.message).__name__ for p in parsed]
    assert names == ["->HelloRequest", "<-HelloResponse", "->AllocBufferRequest",
                     "<-AllocBufferResponse", "->BufferGetBaseRequest", "<-BufferGetBaseResponse",
                     "->SetTensorRequest", "->GetTensorRequest", "<-GetTensorResponse"]
    text = render(cap)
    assert "SET_TENSOR 'probe' f32 [16] offset 0, 64 bytes" in text
    assert "protocol 7.0.0" in text and "client closed the connection" in text


def test_trace_lists_graph_nodes():
    from refimpl.protocol import messages as m
    from refimpl.protocol.tensor import RpcTensor
    a = RpcTensor(id=1, name=b"x")
    b = RpcTensor(id=2, op=25, src=(1,) + (0,) * 9, name=b"normed")
    g = m.GraphComputeRequest.from_tensors(0, [2], [a, b])
    raw = struct.pack("<BQ", 10, len(g.encode_payload())) + g.encode_payload()
    cap = Capture({}, [Record(0, MESSAGE, 0, 0, raw)])
    text = render(cap)
    assert "GRAPH_COMPUTE device 0: 1 nodes, 2 tensors" in text
    assert "RMS_NORM" in text and "<- 'x'" in text


def test_observer_learns_the_protocol_version_from_hello():
    # A 3.6.1 conversation (spec/versions.md): empty HELLO, 3-byte reply, FREE_BUFFER answered
    # with an empty reply, the 304-byte SET_TENSOR header.  The observer must frame and decode
    # all of it with the 3.6.1 profile that the HELLO reply names.
    import struct
    from refimpl.protocol import compat, messages as m
    from refimpl.protocol.profiles import profile
    from refimpl.protocol.tensor import RpcTensor
    p361 = profile("3.6.1")
    frame = lambda cmd, payload=b"": struct.pack("<BQ", cmd, len(payload)) + payload
    reply = lambda payload=b"": struct.pack("<Q", len(payload)) + payload
    t = RpcTensor(id=1, type=0, buffer=7, ne=(4, 1, 1, 1), nb=(4, 16, 16, 16), data=4096)
    obs = Observer()
    seen = []
    for direction, data in [
            (0, frame(14)), (1, reply(bytes([3, 6, 1]))),
            (0, frame(4, struct.pack("<Q", 7))), (1, reply()),
            (0, frame(6, compat.encode(m.SetTensorRequest(t, 0, bytes(16)), p361))),
            (0, frame(8, m.GetTensorRequest(t, 0, 16).encode_payload())), (1, reply(bytes(16)))]:
        parsed = obs.from_client(data) if direction == 0 else obs.from_server(data)
        seen += [(type(o.message).__name__, o.error) for o in parsed]
    assert obs.profile.name == "3.6.1" and obs.profile_note is None
    assert seen == [("HelloRequest", None), ("HelloResponse", None), ("FreeBufferRequest", None),
                    ("EmptyReply", None), ("SetTensorRequest", None), ("GetTensorRequest", None),
                    ("GetTensorResponse", None)]
    # Without the version switch the empty reply would be taken for nothing and every later
    # reply misread: the default (7.0.0) profile pinned by hand shows the failure.
    pinned = Observer(profile("7.0.0"))
    out = [o for d, data in [(0, frame(14)), (1, reply(bytes([3, 6, 1])))]
           for o in (pinned.from_client(data) if d == 0 else pinned.from_server(data))]
    assert out[0].error is not None and out[1].error is not None
