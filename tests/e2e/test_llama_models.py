"""Stock llama.cpp tools run whole models on refimpl-server, judged by the numerics contract.

Random llama-architecture models are written with the gguf package and quantised with the
peer's own llama-quantize: five small ones of assorted shapes, and one of a real small model's
shape (n_embd 576, 9 query / 3 KV heads, ff 1536, 4 layers) in seven weight types.  For each,
with flash attention off and on (spec/numerics.md, "End to end"):

* ``llama-perplexity --kl-divergence-base`` on the host's native llama.cpp CPU run saves the
  reference logits; the same tool with ``--kl-divergence`` then measures llama.cpp's own
  alternatives, its portable build (``GGML_NATIVE=OFF``: AVX2, no AVX-512), its SSE4.2-only
  build (the ISA level of its releases' "sse42" CPU variant, whose 128-bit kernels sum in
  another order than the native build's on every x86-64 host) and its native build without
  weight repacking (``--no-repack``: what its own ggml-rpc-server computes), and, with every
  layer on it, refimpl-server.  refimpl's mean KLD, same-top-token rate and perplexity ratio must
  lie within the contract's bands around the alternatives' (tools.contract).  The realistic
  shape runs batched (perplexity's 128-token graphs) and one token per graph (``-ub 1``, what
  generation sends).
* ``llama-completion --temp 0 --ignore-eos`` through refimpl agrees with the CPU run at least
  as well as one of llama.cpp's own alternatives does (its ggml-rpc-server, its portable
  build, its SSE4.2-only build), or on 98 % of the characters.

Nothing compares bits: the reference is a ``-march=native`` build, whatever the host.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from tools.contract import kld_verdict
from tools.llama_runs import (RunSettings, agreement, completion, kl_divergence,
                              save_base_logits)
from tools.models import LlamaSpec, quantize, write_llama_gguf
from tools.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

#: The shape of a real 135M-parameter llama (SmolLM's), four layers deep, with peaked logits.
REAL_SHAPE = LlamaSpec(n_embd=576, n_layer=4, n_head=9, n_head_kv=3, n_ff=1536, seed=7,
                       output_scale=2.0)
REAL_TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]

#: name -> (spec, weight type)
MODELS = {
    "f32-mha-2L": (LlamaSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128, seed=1), "f32"),
    "f16-gqa2-3L": (LlamaSpec(n_embd=128, n_layer=3, n_head=4, n_head_kv=2, n_ff=256, seed=2), "f16"),
    "q8_0-gqa4-2L": (LlamaSpec(n_embd=128, n_layer=2, n_head=8, n_head_kv=2, n_ff=320, seed=3), "q8_0"),
    "q4_0-hd64-1L": (LlamaSpec(n_embd=128, n_layer=1, n_head=2, n_head_kv=1, n_ff=256, seed=4), "q4_0"),
    "q4_k-256-2L": (LlamaSpec(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, seed=5), "q4_k"),
    **{f"{t}-576-4L": (REAL_SHAPE, t) for t in REAL_TYPES},
}

#: (model, step) pairs measured: every model batched, the realistic shape also one token a step
#: step -> (settings, chunks)
STEPS = {"batched": (RunSettings(ctx=128), 3), "ub1": (RunSettings(ctx=64, ubatch=1), 4)}
CASES = [(m, "batched") for m in MODELS] + [(m, "ub1") for m in MODELS if "-576-" in m]

PROMPT = "the cat sat on the"
N_PREDICT = 48

_results: dict = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("models")
    out, f32 = {}, {}
    for name, (spec, kind) in MODELS.items():
        if spec not in f32:
            f32[spec] = write_llama_gguf(root / f"{name}-f32.gguf", spec)
        out[name] = f32[spec] if kind == "f32" else quantize(f32[spec], root / f"{name}.gguf",
                                                             kind, peer_bin)
    return out


@pytest.fixture(scope="module")
def llama_server(peer_bin):
    with ServerProcess("llama.cpp", bin_dir=peer_bin) as srv:
        yield srv


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("name,step", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_logits_within_contract(peer_bin, portable_lib, sse42_lib, models, text_file,
                                refimpl_server, tmp_path, name, step, fa):
    settings, chunks = STEPS[step]
    s = replace(settings, flash_attn=fa, threads=1)
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, models[name], text_file,
                                  refimpl_server, tmp_path, s, chunks,
                                  f"{name}/{step}/{'fa' if fa else 'nofa'}")


def assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, model, text_file,
                                  server, tmp_path, s, chunks, key, results=_results):
    """The contract's check of ``model`` with settings ``s``: the native CPU run's logits
    (``chunks`` chunks of ``text_file``), llama.cpp's three alternatives' and ``server``'s
    KLD from them, recorded in ``results["kld"][key]``; asserts the verdict."""
    base = tmp_path / "base.kld"
    save_base_logits(peer_bin, model, text_file, s, base, chunks=chunks)
    alternatives = {
        "portable": kl_divergence(peer_bin, model, base, s, lib_dir=portable_lib,
                                  chunks=chunks),
        "no-repack": kl_divergence(peer_bin, model, base, replace(s, repack=False),
                                   chunks=chunks),
        "sse42": kl_divergence(peer_bin, model, base, s, lib_dir=sse42_lib, chunks=chunks)}
    ours = kl_divergence(peer_bin, model, base, s, rpc=server.endpoint, chunks=chunks)
    results.setdefault("kld", {})[key] = {
        **{k: vars(v) for k, v in alternatives.items()}, "refimpl": vars(ours)}
    problems = kld_verdict(ours, alternatives)
    assert not problems, "; ".join(problems)
    assert server.alive()


#: (model, step, -ctk, -ctv, flash attention): quantised KV caches, as users run them
KV_CASES = [("f16-gqa2-3L", "batched", "q8_0", "q8_0", True),
            ("q8_0-576-4L", "ub1", "q8_0", "q8_0", True),
            ("q4_0-576-4L", "batched", "q4_0", "q4_1", True),
            ("q4_0-hd64-1L", "batched", "q5_0", "q5_1", True),
            ("q4_k-576-4L", "batched", "q8_0", None, False),
            ("f16-gqa2-3L", "batched", "iq4_nl", "iq4_nl", True)]


@pytest.mark.parametrize("name,step,ctk,ctv,fa", KV_CASES,
                         ids=[f"{m}-{s}-k{k}-v{v or 'f16'}-{'fa' if f else 'nofa'}"
                              for m, s, k, v, f in KV_CASES])
def test_quantised_kv_cache_within_contract(peer_bin, portable_lib, sse42_lib, models, text_file,
                                            refimpl_server, tmp_path, name, step, ctk, ctv, fa):
    """``-ctk``/``-ctv`` quantised caches: SET_ROWS into the blocks, FLASH_ATTN_EXT over them
    (or, without flash attention, MUL_MAT with a quantised K view), judged as above."""
    settings, chunks = STEPS[step]
    s = replace(settings, flash_attn=fa, threads=1, cache_k=ctk, cache_v=ctv)
    assert_logits_within_contract(peer_bin, portable_lib, sse42_lib, models[name], text_file,
                                  refimpl_server, tmp_path, s, chunks,
                                  f"{name}/{step}/k{ctk}-v{ctv or 'f16'}/{'fa' if fa else 'nofa'}")


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("name", [m for m in MODELS if "-576-" not in m])
def test_greedy_text_agrees_with_cpu(peer_bin, portable_lib, sse42_lib, models,
                                     refimpl_server, llama_server, name, fa):
    s = RunSettings(flash_attn=fa, threads=1)
    local = completion(peer_bin, models[name], PROMPT, N_PREDICT, s)
    ours = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, rpc=refimpl_server.endpoint)
    theirs = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, rpc=llama_server.endpoint)
    portable = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, lib_dir=portable_lib)
    sse42 = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, lib_dir=sse42_lib)
    a_ours = agreement(local, ours)
    alternatives = {"llama.cpp rpc-server": agreement(local, theirs),
                    "llama.cpp portable": agreement(local, portable),
                    "llama.cpp sse42": agreement(local, sse42)}
    _results.setdefault("agreement", {})[f"{name}/{'fa' if fa else 'nofa'}"] = {
        "refimpl": a_ours, **alternatives}
    assert len(local) > N_PREDICT / 2
    assert a_ours >= min(alternatives.values()) or a_ours >= 0.98, (
        f"refimpl agrees on {a_ours:.1%} of characters, llama.cpp's alternatives on "
        f"{alternatives}\ncpu:     {local!r}\nrefimpl: {ours!r}")


def teardown_module(module):
    """Keep the measurements (docs/e2e.md is written from them)."""
    out = os.environ.get("REFIMPL_E2E_REPORT")
    if out and _results:
        Path(out).write_text(json.dumps(_results, indent=1) + "\n")
