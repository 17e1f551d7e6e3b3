"""Mixture-of-experts models through refimpl-server, judged by the numerics contract
(issue 13 item 2): random qwen3moe models (softmax gating, top-k experts by ARGSORT, weights
normalised by SUM_ROWS, CLAMP and DIV, experts by MUL_MAT_ID), written with the gguf package
and quantised with the peer's llama-quantize, every layer on refimpl-server; and random gpt-oss
models (Q/K/V/output biases, attention sinks, sliding-window attention on alternate layers, a
router bias, softmax over the chosen experts' logits, expert biases by ADD_ID, SWIGLU_OAI), in
F32, F16 and with llama-quantize's MXFP4_MOE (MXFP4 experts, Q8_0 elsewhere).  As in
tests/e2e/test_llama_models.py: refimpl's mean KLD, same-top-token rate and perplexity ratio
against the host's llama.cpp CPU run must lie within the contract's bands around llama.cpp's
own alternatives (its portable and SSE4.2 builds, its CPU run without repacking)."""

from __future__ import annotations

import pytest

from tools.llama_runs import RunSettings
from tools.models import ModelSpec, quantize, write_gguf

from .test_llama_models import assert_logits_within_contract

pytestmark = [pytest.mark.peer, pytest.mark.slow]

QWEN3MOE = ModelSpec(arch="qwen3moe", n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=64,
                     n_expert=8, n_expert_used=2, seed=13)
TYPES = ["f32", "q8_0", "q4_k"]
#: (weight type, flash attention): both attention paths once, each quantised type once
CASES = [("f32", False), ("f32", True), ("q8_0", False), ("q4_k", True)]

GPT_OSS = ModelSpec(arch="gpt-oss", n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                    key_length=64, rope_theta=150000.0, sliding_window=32, n_expert=8,
                    n_expert_used=2, output_scale=2.0, seed=16)
#: (weight type, flash attention): F32 and F16 with both attention paths, MXFP4 experts with fa
GPT_OSS_CASES = [("f32", False), ("f32", True), ("f16", False), ("f16", True),
                 ("mxfp4_moe", True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("moe")
    f32 = write_gguf(root / "qwen3moe-f32.gguf", QWEN3MOE)
    return {t: f32 if t == "f32" else quantize(f32, root / f"qwen3moe-{t}.gguf", t, peer_bin)
            for t in TYPES}


@pytest.mark.parametrize("kind,fa", CASES,
                         ids=[f"{k}-fa-{'on' if f else 'off'}" for k, f in CASES])
def test_qwen3moe_logits_within_contract(peer_bin, portable_lib, sse42_lib, models, text_file,
                                         refimpl_server, tmp_path, kind, fa):
    s = RunSettings(ctx=128, flash_attn=fa, threads=1)
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, models[kind], text_file,
                                  refimpl_server, tmp_path, s, 2,
                                  f"qwen3moe-{kind}/batched/{'fa' if fa else 'nofa'}")


@pytest.fixture(scope="module")
def gpt_oss_models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("gpt-oss")
    f32 = write_gguf(root / "gpt-oss-f32.gguf", GPT_OSS)
    return {t: f32 if t == "f32" else quantize(f32, root / f"gpt-oss-{t}.gguf", t, peer_bin)
            for t in {k for k, _ in GPT_OSS_CASES}}


@pytest.mark.parametrize("kind,fa", GPT_OSS_CASES,
                         ids=[f"{k}-fa-{'on' if f else 'off'}" for k, f in GPT_OSS_CASES])
def test_gpt_oss_logits_within_contract(peer_bin, portable_lib, sse42_lib, gpt_oss_models,
                                        text_file, refimpl_server, tmp_path, kind, fa):
    s = RunSettings(ctx=128, flash_attn=fa, threads=1)
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, gpt_oss_models[kind],
                                  text_file, refimpl_server, tmp_path, s, 2,
                                  f"gpt-oss-{kind}/batched/{'fa' if fa else 'nofa'}")
