"""refimpl.kernels.parallel: which compiled twin of a kernel a call runs (issue 12).

A one-token product has as many outputs as the weights have rows, yet reads all of the
weights: it must go parallel by the size of its weights, with the device's threads, and stay
serial with one thread or little work."""

from __future__ import annotations

import threading

import numpy as np

from refimpl.kernels import matmul_fast as fast
from refimpl.kernels.parallel import compute_threads, set_compute_threads
from refimpl.kernels.quants import Q4_0, table_for


def _one_token_args(n: int, k: int):
    w = np.zeros((1, 1, n, k // 32 * 18), np.uint8)
    aq = np.zeros((1, k), np.int8)
    ad, asum = np.zeros((1, k // 32), np.float32), np.zeros((1, k // 32), np.float32)
    return w, aq, ad, asum, np.zeros((1, 1), np.int32), np.zeros((1, 1, 1, n), np.float32), \
        table_for(Q4_0)


def _picked(threads: int, n: int, k: int):
    """The twin chosen in a fresh thread with ``threads`` compute threads."""
    got = []

    def work():
        set_compute_threads(threads)
        kernel = fast._PACKED_KERNELS[Q4_0]
        got.append(kernel.pick(*_one_token_args(n, k)) is kernel.parallel)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return got[0]


def test_one_token_products_of_large_weights_run_in_parallel():
    # a 1B model's attention product: 2048 outputs, but 2.4 MB of weights
    assert _picked(2, 2048, 2048)
    assert not _picked(1, 2048, 2048)             # -t 1: no launch at all
    assert not _picked(2, 32, 64)                 # 1 KiB of weights: not worth a launch


def test_prompt_products_of_small_weights_run_in_parallel():
    """A prompt's product is measured by its weights times its activation rows: a 135M
    model's K/V projection (192 rows of 576, 62 KiB) runs serial for one token, in parallel
    for a prompt of 128."""
    w, aq, ad, asum, bsums, out, table = _one_token_args(192, 576)
    kernel = fast._PACKED_KERNELS[Q4_0]
    got = []

    def work():
        set_compute_threads(2)
        got.append(kernel.pick(w, aq, ad, asum, bsums, out, table) is kernel.parallel)
        m = 128
        got.append(kernel.pick(w, np.zeros((m, 576), np.int8), np.zeros((m, 18), np.float32),
                               np.zeros((m, 18), np.float32), np.zeros((m, 1), np.int32),
                               np.zeros((1, 1, m, 192), np.float32), table) is kernel.parallel)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got == [False, True]


def test_thread_count_is_per_thread():
    before = compute_threads()
    assert _picked(2, 2048, 2048)
    assert compute_threads() == before            # the other thread's setting stays there
