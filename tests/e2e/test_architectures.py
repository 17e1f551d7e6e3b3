"""Architectures other than llama, on refimpl-server, judged by the numerics contract.

Small random models of qwen2 (Q/K/V biases), qwen3 (per-head Q/K norms, head size 64 with
n_embd 128), phi3 (fused ``attn_qkv``, ``ffn_up`` holding gate and up: the one-tensor SWIGLU)
and gemma3 (embedding scaled by sqrt(n_embd), Q/K norms, post-attention and post-FFN norms,
GELU-gated FFN, tied output, sliding-window attention on every other layer with its own rope
base) are written with the gguf package (tools.models) and converted to F16 with the peer's
``llama-quantize``.  Each runs as tests/e2e/test_llama_models.py's batched step does, with flash
attention off and on, with a Q8_0 KV cache (``-ctk q8_0 -ctv q8_0 -fa on``), and with IQ4_XS
weights (a llama of n_embd 256 too; rows of 128 fall back to IQ4_NL); phi3 (every row 256
wide) also with IQ3_S weights, the codebook format llama-quantize makes without an importance
matrix (its token embedding IQ3_S too, read by GET_ROWS; the output Q6_K): refimpl's KLD
from the host's native CPU run must lie within the contract's bands around llama.cpp's
portable, no-repack and sse42 runs (spec/numerics.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.e2e.test_llama_models import STEPS, assert_logits_within_contract
from tests.e2e.test_llama_models import teardown_module  # noqa: F401  (writes the shared report)
from tools.models import ModelSpec, quantize, write_gguf

pytestmark = [pytest.mark.peer, pytest.mark.slow]

#: architecture -> its model (head sizes multiples of 32, so that quantised caches apply).  The
#: untied output projections are scaled up twofold (peaked next-token distributions, as in
#: test_llama_models' realistic shape); gemma3's output is its embedding, whose own token then
#: dominates the logits already (a twofold scale there puts the text's PPL in the 10^5s)
ARCH_MODELS = {
    "llama": ModelSpec(arch="llama", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512,
                       output_scale=2.0, seed=15),
    "qwen2": ModelSpec(arch="qwen2", n_embd=128, n_layer=2, n_head=2, n_head_kv=1, n_ff=256,
                       rope_theta=1e6, rms_eps=1e-6, output_scale=2.0, seed=11),
    "qwen3": ModelSpec(arch="qwen3", n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256,
                       key_length=64, rope_theta=1e6, rms_eps=1e-6, output_scale=2.0, seed=12),
    "phi3": ModelSpec(arch="phi3", n_embd=256, n_layer=2, n_head=4, n_head_kv=4, n_ff=256,
                      output_scale=2.0, seed=13),
    "gemma3": ModelSpec(arch="gemma3", n_embd=128, n_layer=4, n_head=4, n_head_kv=1, n_ff=256,
                        key_length=64, rope_theta=1e6, rms_eps=1e-6, sliding_window=32,
                        swa_pattern=2, rope_theta_swa=1e4, seed=14),
}

#: (weights, -ctk/-ctv or None for the default F16 cache, flash attention); IQ4_XS weights (rows
#: of 128 fall back to llama-quantize's IQ4_NL) once per architecture, llama's included
CACHES = [("f16", None, False), ("f16", None, True), ("f16", "q8_0", True), ("iq4_xs", None, True)]
CASES = [(arch, *c) for arch in ARCH_MODELS for c in CACHES] + [("phi3", "iq3_s", None, True)]

#: (arch, weights, cache, fa) -> why refimpl is known to miss the contract there (strict xfail:
#: the case fails the run once it passes, so the entry must then go)
REFUSED: dict[tuple, str] = {
    ("llama", "iq4_xs", None, True): (
        "open (issue 13): on this 256-wide llama every quantised weight type (IQ4_XS, Q6_K, "
        "Q4_K) puts refimpl at a mean KLD of 1.2e-4 to 2.5e-4 from the native run, as at the "
        "previous landing (5953fee measures the same), while each MUL_MAT matches ggml-cpu to "
        "an NMSE of 1e-13; IQ4_XS's band here is 1.06e-4 (sse42 5.3e-5, the others 0)"),
}


def _case_id(arch, weights, cache, fa) -> str:
    return (f"{arch}-{weights}-{'k' + cache + '-v' + cache if cache else 'f16cache'}-"
            f"{'fa' if fa else 'nofa'}")


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("arch-models")
    out = {}
    for arch, spec in ARCH_MODELS.items():
        f32 = write_gguf(root / f"{arch}-f32.gguf", spec)
        for weights in ("f16", "iq4_xs") + (("iq3_s",) if arch == "phi3" else ()):
            out[arch, weights] = quantize(f32, root / f"{arch}-{weights}.gguf", weights, peer_bin)
    return out


@pytest.mark.parametrize("arch,weights,cache,fa", [
    pytest.param(*c, id=_case_id(*c),
                 marks=[pytest.mark.xfail(strict=True, reason=REFUSED[c])] if c in REFUSED else [])
    for c in CASES])
def test_architecture_logits_within_contract(peer_bin, portable_lib, sse42_lib, arch_models,
                                             text_file, refimpl_server, tmp_path, arch, weights,
                                             cache, fa):
    settings, chunks = STEPS["batched"]
    s = replace(settings, flash_attn=fa, threads=1, cache_k=cache, cache_v=cache)
    step = f"batched/k{cache}-v{cache}" if cache else "batched"  # test_llama_models' keys
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, arch_models[arch, weights],
                                  text_file, refimpl_server, tmp_path, s, chunks,
                                  f"{arch}-{weights}/{step}/{'fa' if fa else 'nofa'}")
