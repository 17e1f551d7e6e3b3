"""A recurrent architecture on refimpl-server, judged by the numerics contract (issue 14 item 5).

A small random Mamba (v1) model (tools.models, ``ModelSpec(arch="mamba")``: two blocks of
n_embd 64, d_inner 128, d_state 16, d_conv 4), converted to F16 with the peer's
``llama-quantize``, runs as tests/e2e/test_llama_models.py's batched step does.  Its graphs
need, besides views: GET_ROWS (embeddings, the recurrent states' rows), RMS_NORM, MUL_MAT, MUL,
ADD, SCALE (the zeroed state, often an empty view), CONCAT (the conv state before the new
tokens), CPY and CONT, SSM_CONV, UNARY SILU, SSM_SCAN (states picked by the sequence ids of the
recurrent cache) and GLU SWIGLU (split).  refimpl's KLD from the host's native CPU run must
lie within the contract's bands around llama.cpp's portable, no-repack and sse42 runs
(spec/numerics.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.e2e.test_llama_models import STEPS, assert_logits_within_contract
from tests.e2e.test_llama_models import teardown_module  # noqa: F401  (writes the shared report)
from tools.models import ModelSpec, quantize, write_gguf

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MAMBA = ModelSpec(arch="mamba", n_embd=64, n_layer=2, output_scale=2.0, seed=21)


@pytest.fixture(scope="module")
def mamba_model(tmp_path_factory, peer_bin):
    root = tmp_path_factory.mktemp("recurrent-models")
    return quantize(write_gguf(root / "mamba-f32.gguf", MAMBA), root / "mamba-f16.gguf", "f16",
                    peer_bin)


def test_mamba_logits_within_contract(peer_bin, portable_lib, sse42_lib, mamba_model, text_file,
                                      refimpl_server, tmp_path):
    settings, chunks = STEPS["batched"]
    s = replace(settings, threads=1)
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, mamba_model, text_file,
                                  refimpl_server, tmp_path, s, chunks, "mamba-f16/batched")
