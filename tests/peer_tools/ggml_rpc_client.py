"""Drive llama.cpp's own RPC client code (libggml-rpc from the peer build) through ctypes.

Run as a separate process, since llama.cpp's client aborts the whole process when a server
misbehaves:

    python ggml_rpc_client.py BIN_DIR HOST:PORT [--big]

It exercises, through ggml's public backend API, every buffer operation the RPC client
implements (HELLO, DEVICE_COUNT, GET_ALIGNMENT, GET_MAX_SIZE, GET_DEVICE_MEMORY,
ALLOC_BUFFER, BUFFER_GET_BASE, INIT_TENSOR, GET_ALLOC_SIZE, SET_TENSOR, GET_TENSOR,
MEMSET_TENSOR, COPY_TENSOR, BUFFER_CLEAR, FREE_BUFFER, and with --big the SET_TENSOR_HASH
path for a weight above 10 MiB), checks every result it can check locally, and prints one JSON
object with what it saw.  Exit status 0 means every local check held.
"""

from __future__ import annotations

import ctypes as C
import json
import os
import sys

import numpy as np

GGML_TYPE_F32 = 0
GGML_TYPE_Q4_0 = 2
USAGE_WEIGHTS = 1


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def load(bin_dir: str):
    """Load libggml-base and libggml-rpc and declare the functions used here."""
    mode = C.RTLD_GLOBAL
    base = C.CDLL(os.path.join(bin_dir, "libggml-base.so"), mode=mode)
    rpc = C.CDLL(os.path.join(bin_dir, "libggml-rpc.so"), mode=mode)
    P, S, U32, I64, I32 = C.c_void_p, C.c_size_t, C.c_uint32, C.c_int64, C.c_int
    sig = {
        (rpc, "ggml_backend_rpc_add_server"): (P, [C.c_char_p]),
        (rpc, "ggml_backend_rpc_buffer_type"): (P, [C.c_char_p, U32]),
        (rpc, "ggml_backend_rpc_get_device_memory"): (None, [C.c_char_p, U32, C.POINTER(S), C.POINTER(S)]),
        (base, "ggml_backend_buft_get_alignment"): (S, [P]),
        (base, "ggml_backend_buft_get_max_size"): (S, [P]),
        (base, "ggml_backend_buft_get_alloc_size"): (S, [P, P]),
        (base, "ggml_backend_buft_alloc_buffer"): (P, [P, S]),
        (base, "ggml_backend_buffer_get_base"): (P, [P]),
        (base, "ggml_backend_buffer_get_size"): (S, [P]),
        (base, "ggml_backend_buffer_clear"): (None, [P, C.c_uint8]),
        (base, "ggml_backend_buffer_free"): (None, [P]),
        (base, "ggml_backend_buffer_set_usage"): (None, [P, I32]),
        (base, "ggml_backend_tensor_alloc"): (I32, [P, P, P]),
        (base, "ggml_backend_tensor_set"): (None, [P, P, S, S]),
        (base, "ggml_backend_tensor_get"): (None, [P, P, S, S]),
        (base, "ggml_backend_tensor_memset"): (None, [P, C.c_uint8, S, S]),
        (base, "ggml_backend_tensor_copy"): (None, [P, P]),
        (base, "ggml_init"): (P, [InitParams]),
        (base, "ggml_free"): (None, [P]),
        (base, "ggml_new_tensor_1d"): (P, [P, I32, I64]),
        (base, "ggml_new_tensor_2d"): (P, [P, I32, I64, I64]),
        (base, "ggml_nbytes"): (S, [P]),
    }
    for (lib, name), (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return base, rpc


def main(argv) -> int:
    bin_dir, endpoint = argv[0], argv[1].encode()
    big = "--big" in argv
    base, rpc = load(bin_dir)
    out: dict = {}
    failures: list[str] = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    reg = rpc.ggml_backend_rpc_add_server(endpoint)  # HELLO + DEVICE_COUNT
    check(reg is not None, "add_server returned NULL")
    buft = rpc.ggml_backend_rpc_buffer_type(endpoint, 0)  # GET_ALIGNMENT + GET_MAX_SIZE
    out["alignment"] = base.ggml_backend_buft_get_alignment(buft)
    out["max_size"] = base.ggml_backend_buft_get_max_size(buft)
    free, total = C.c_size_t(), C.c_size_t()
    rpc.ggml_backend_rpc_get_device_memory(endpoint, 0, C.byref(free), C.byref(total))
    out["memory"] = [free.value, total.value]
    check(0 < free.value <= total.value, "device memory free/total inconsistent")

    n = 1 << 16  # floats
    size = 3 * n * 4 + 4096
    buf = base.ggml_backend_buft_alloc_buffer(buft, size)  # ALLOC_BUFFER
    check(buf is not None, "alloc_buffer failed")
    out["buffer_size"] = base.ggml_backend_buffer_get_size(buf)
    b0 = base.ggml_backend_buffer_get_base(buf)  # BUFFER_GET_BASE
    out["base_aligned"] = b0 % out["alignment"] == 0
    check(out["base_aligned"], "base not aligned")

    ctx = base.ggml_init(InitParams(16 * 1024 * 1024, None, True))
    a = base.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n)
    b = base.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n)
    q = base.ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_0, 96, 4)  # ne0 % 512 != 0: server is asked
    out["q4_alloc_size"] = base.ggml_backend_buft_get_alloc_size(buft, q)  # GET_ALLOC_SIZE
    check(out["q4_alloc_size"] >= base.ggml_nbytes(q), "alloc size below nbytes")
    check(base.ggml_backend_tensor_alloc(buf, a, b0) == 0, "tensor_alloc a")
    check(base.ggml_backend_tensor_alloc(buf, b, b0 + n * 4) == 0, "tensor_alloc b")
    check(base.ggml_backend_tensor_alloc(buf, q, b0 + 2 * n * 4) == 0, "tensor_alloc q")  # INIT_TENSOR

    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    base.ggml_backend_tensor_set(a, x.ctypes.data, 0, x.nbytes)  # SET_TENSOR
    y = np.zeros_like(x)
    base.ggml_backend_tensor_get(a, y.ctypes.data, 0, y.nbytes)  # GET_TENSOR
    out["set_get_roundtrip"] = bool((x == y).all())
    check(out["set_get_roundtrip"], "set/get round trip")

    base.ggml_backend_tensor_set(a, x.ctypes.data, 400, 64)  # partial write at an offset
    base.ggml_backend_tensor_get(a, y.ctypes.data, 0, y.nbytes)
    expect = x.copy()
    expect.view(np.uint8)[400:464] = x.view(np.uint8)[:64]
    out["partial_set"] = bool((y.view(np.uint8) == expect.view(np.uint8)).all())
    check(out["partial_set"], "partial set")

    base.ggml_backend_tensor_copy(a, b)  # COPY_TENSOR
    z = np.zeros_like(x)
    base.ggml_backend_tensor_get(b, z.ctypes.data, 0, z.nbytes)
    out["copy"] = bool((z.view(np.uint8) == expect.view(np.uint8)).all())
    check(out["copy"], "copy")

    base.ggml_backend_tensor_memset(b, 0xAB, 8, 16)  # MEMSET_TENSOR
    base.ggml_backend_tensor_get(b, z.ctypes.data, 0, z.nbytes)
    zb = z.view(np.uint8)
    out["memset"] = bool((zb[8:24] == 0xAB).all() and (zb[:8] == expect.view(np.uint8)[:8]).all()
                         and (zb[24:] == expect.view(np.uint8)[24:]).all())
    check(out["memset"], "memset")

    base.ggml_backend_buffer_clear(buf, 0x5A)  # BUFFER_CLEAR
    base.ggml_backend_tensor_get(a, y.ctypes.data, 0, y.nbytes)
    out["clear"] = bool((y.view(np.uint8) == 0x5A).all())
    check(out["clear"], "clear")

    if big:  # a weight above the 10 MiB threshold takes the SET_TENSOR_HASH path
        big_n = 3 * 1024 * 1024  # 12 MiB of floats
        wbuf = base.ggml_backend_buft_alloc_buffer(buft, big_n * 4)
        base.ggml_backend_buffer_set_usage(wbuf, USAGE_WEIGHTS)
        w = base.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, big_n)
        check(base.ggml_backend_tensor_alloc(wbuf, w, base.ggml_backend_buffer_get_base(wbuf)) == 0,
              "tensor_alloc w")
        data = np.arange(big_n, dtype=np.float32) * 0.5
        base.ggml_backend_tensor_set(w, data.ctypes.data, 0, data.nbytes)
        back = np.zeros_like(data)
        base.ggml_backend_tensor_get(w, back.ctypes.data, 0, back.nbytes)
        out["big_roundtrip"] = bool((back == data).all())
        check(out["big_roundtrip"], "big weight round trip")
        base.ggml_backend_buffer_free(wbuf)

    base.ggml_backend_buffer_free(buf)  # FREE_BUFFER
    # A final round trip proves the server took the reply-less commands above.
    rpc.ggml_backend_rpc_get_device_memory(endpoint, 0, C.byref(free), C.byref(total))
    base.ggml_free(ctx)
    out["failures"] = failures
    print(json.dumps(out))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
