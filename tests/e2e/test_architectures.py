"""Architectures other than llama, on refimpl-server, judged by the numerics contract.

Small random models of qwen2 (Q/K/V biases), qwen3 (per-head Q/K norms, head size 64 with
n_embd 128), phi3 (fused ``attn_qkv``, ``ffn_up`` holding gate and up: the one-tensor SWIGLU)
and gemma3 (embedding scaled by sqrt(n_embd), Q/K norms, post-attention and post-FFN norms,
GELU-gated FFN, tied output, sliding-window attention on every other layer with its own rope
base) are written with the gguf package (tools.models) and converted to F16 with the peer's
``llama-quantize``.  Each runs as tests/e2e/test_llama_models.py's batched step does, with flash
attention off and on, and with a Q8_0 KV cache (``-ctk q8_0 -ctv q8_0 -fa on``): refimpl's KLD
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

#: (-ctk/-ctv or None for the default F16 cache, flash attention)
CACHES = [(None, False), (None, True), ("q8_0", True)]
CASES = [(arch, cache, fa) for arch in ARCH_MODELS for cache, fa in CACHES]

#: (arch, cache, fa) -> the op refimpl refuses (strict xfail); none today
REFUSED: dict[tuple, str] = {}


def _case_id(arch, cache, fa) -> str:
    return f"{arch}-{'k' + cache + '-v' + cache if cache else 'f16cache'}-{'fa' if fa else 'nofa'}"


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("arch-models")
    return {arch: quantize(write_gguf(root / f"{arch}-f32.gguf", spec), root / f"{arch}-f16.gguf",
                           "f16", peer_bin)
            for arch, spec in ARCH_MODELS.items()}


@pytest.mark.parametrize("arch,cache,fa", [
    pytest.param(*c, id=_case_id(*c),
                 marks=[pytest.mark.xfail(strict=True, reason=REFUSED[c])] if c in REFUSED else [])
    for c in CASES])
def test_architecture_logits_within_contract(peer_bin, portable_lib, sse42_lib, arch_models,
                                             text_file, refimpl_server, tmp_path, arch, cache,
                                             fa):
    settings, chunks = STEPS["batched"]
    s = replace(settings, flash_attn=fa, threads=1, cache_k=cache, cache_v=cache)
    step = f"batched/k{cache}-v{cache}" if cache else "batched"  # test_llama_models' keys
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, arch_models[arch],
                                  text_file, refimpl_server, tmp_path, s, chunks,
                                  f"{arch}-f16/{step}/{'fa' if fa else 'nofa'}")
