"""Loopback benchmark: refimpl-server against llama.cpp's ggml-rpc-server, in one run.

    python bench/rpc_bench.py [--size-mib 256] [--repeat 5] [--round-trips 5000] [--json out.json]

For each server, with the same client:

* round trip: GET_ALIGNMENT request/reply latency (median, microseconds);
* upload: SET_TENSOR of one large tensor, timed until a following round trip returns (MB/s);
* first upload: the same into a freshly allocated buffer, as loading a model does (MB/s);
* download: GET_TENSOR of the same tensor into preallocated memory (MB/s).

The client is a plain blocking socket driving refimpl's sans-IO ClientConnection
(tools/blocking_client.py), so client overhead is identical for both servers.  Ratios are
refimpl ÷ llama.cpp: above 1 is better for throughput, below 1 is better for latency.  Figures depend on the machine and its load; only
ratios from the same run are meaningful.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.protocol import messages as m  # noqa: E402
from refimpl.protocol.ggml_types import GgmlType  # noqa: E402
from refimpl.protocol.tensor import RpcTensor, contiguous_strides  # noqa: E402
from tools.blocking_client import BlockingClient  # noqa: E402
from tools.peers import ensure_peers  # noqa: E402
from tools.processes import ServerProcess  # noqa: E402


def measure(address, size: int, repeat: int, round_trips: int) -> dict:
    c = BlockingClient(address)
    try:
        req = m.GetAlignmentRequest(0)
        for _ in range(200):
            c.call(req)
        lat = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            c.call(req)
            lat.append(time.perf_counter() - t0)
        alloc = c.call(m.AllocBufferRequest(0, size))
        base = c.call(m.BufferGetBaseRequest(alloc.handle)).base
        ne = (size, 1, 1, 1)
        t = RpcTensor(id=1, type=GgmlType.I8, buffer=alloc.handle, ne=ne,
                      nb=contiguous_strides(GgmlType.I8, ne), data=base)
        data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        out = np.empty_like(data)
        up, down = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            c.set_tensor(t, data)
            c.call(req)  # returns once the server has taken the whole upload
            up.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.get_tensor(t, out)
            down.append(time.perf_counter() - t0)
        if not np.array_equal(out, data):
            raise RuntimeError("downloaded bytes differ from the upload")
        c.call(m.FreeBufferRequest(alloc.handle))
        c.call(req)
        first = []       # into a freshly allocated buffer: what loading a model does
        for _ in range(repeat):
            fresh = c.call(m.AllocBufferRequest(0, size))
            fbase = c.call(m.BufferGetBaseRequest(fresh.handle)).base
            ft = RpcTensor(id=2, type=GgmlType.I8, buffer=fresh.handle, ne=ne,
                           nb=contiguous_strides(GgmlType.I8, ne), data=fbase)
            t0 = time.perf_counter()
            c.set_tensor(ft, data)
            c.call(req)
            first.append(time.perf_counter() - t0)
            c.call(m.FreeBufferRequest(fresh.handle))
    finally:
        c.close()
    mb = size / 1e6
    return {
        "round_trip_us": statistics.median(lat) * 1e6,
        "upload_MBps": mb / statistics.median(up),
        "first_upload_MBps": mb / statistics.median(first),
        "download_MBps": mb / statistics.median(down),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="tensor size (default 256)")
    p.add_argument("--repeat", type=int, default=5, help="uploads/downloads per server")
    p.add_argument("--round-trips", type=int, default=5000, help="latency samples per server")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    size = args.size_mib << 20
    peer_bin = ensure_peers()
    results = {}
    for kind in ("refimpl", "llama.cpp"):
        with ServerProcess(kind, bin_dir=peer_bin if kind == "llama.cpp" else None) as srv:
            results[kind] = measure(srv.address, size, args.repeat, args.round_trips)
    rows = [("round trip (median, µs)", "round_trip_us"),
            (f"upload {args.size_mib} MiB (MB/s)", "upload_MBps"),
            (f"first upload {args.size_mib} MiB (MB/s)", "first_upload_MBps"),
            (f"download {args.size_mib} MiB (MB/s)", "download_MBps")]
    print(f"{'metric':34} {'refimpl':>12} {'llama.cpp':>12} {'ratio':>8}")
    for label, key in rows:
        a, b = results["refimpl"][key], results["llama.cpp"][key]
        print(f"{label:34} {a:12.1f} {b:12.1f} {a / b:8.2f}")
    print("ratio = refimpl / llama.cpp (throughput: higher is better; latency: lower is better)")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
            "processor": platform.processor(), "size_mib": args.size_mib, "results": results,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
