"""Stock llama.cpp tools run whole models on refimpl-server and print what they print alone.

Small random llama models (several shapes, GQA ratios, head sizes and weight types) are
written with the gguf package (quantised with the peer's own llama-quantize).  For each:

* ``llama-perplexity`` through refimpl (``-ngl 99 --rpc``) equals the CPU-only run
  (``-ngl 0``, no ``--rpc``) within 0.1 % relative;
* ``llama-completion --temp 0 --ignore-eos`` through refimpl agrees with the single-threaded
  CPU-only run at least as well as llama.cpp's own ggml-rpc-server does on the same model.

Both with flash attention off and on.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from refimpl.testing.llama_runs import RunSettings, agreement, completion, perplexity, sample_text
from refimpl.testing.models import LlamaSpec, quantize, write_llama_gguf
from refimpl.testing.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

#: name -> (spec, weight type)
MODELS = {
    "f32-mha-2L": (LlamaSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128, seed=1), "f32"),
    "f16-gqa2-3L": (LlamaSpec(n_embd=128, n_layer=3, n_head=4, n_head_kv=2, n_ff=256, seed=2), "f16"),
    "q8_0-gqa4-2L": (LlamaSpec(n_embd=128, n_layer=2, n_head=8, n_head_kv=2, n_ff=320, seed=3), "q8_0"),
    "q4_0-hd64-1L": (LlamaSpec(n_embd=128, n_layer=1, n_head=2, n_head_kv=1, n_ff=256, seed=4), "q4_0"),
    "q4_k-256-2L": (LlamaSpec(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, seed=5), "q4_k"),
}
PROMPT = "the cat sat on the"
N_PREDICT = 48

_results: dict = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory, peer_bin) -> dict:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, (spec, kind) in MODELS.items():
        f32 = write_llama_gguf(root / f"{name}-f32.gguf", spec)
        out[name] = f32 if kind == "f32" else quantize(f32, root / f"{name}.gguf", kind, peer_bin)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(sample_text())
    return p


@pytest.fixture(scope="module")
def refimpl_server():
    with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def llama_server(peer_bin):
    with ServerProcess("llama.cpp", bin_dir=peer_bin) as srv:
        yield srv


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("name", list(MODELS))
def test_perplexity_matches_cpu(peer_bin, models, text_file, refimpl_server, name, fa):
    s = RunSettings(flash_attn=fa, threads=1)
    local = perplexity(peer_bin, models[name], text_file, s)
    remote = perplexity(peer_bin, models[name], text_file, s, rpc=refimpl_server.endpoint)
    plain = perplexity(peer_bin, models[name], text_file, replace(s, repack=False))
    _results.setdefault("perplexity", {})[f"{name}/{'fa' if fa else 'nofa'}"] = [local, remote,
                                                                                 plain]
    assert abs(remote - local) / local < 1e-3, f"PPL {remote} through refimpl vs {local} on CPU"
    # the kernels compute what ggml's CPU backend computes, to the last printed digit, once
    # its Q4_0/Q4_K weight repacking (a CPU-only layout) is off
    assert remote == plain, f"PPL {remote} through refimpl vs {plain} on CPU with --no-repack"
    assert refimpl_server.alive()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_text_agrees_with_cpu(peer_bin, models, refimpl_server, llama_server, name, fa):
    s = RunSettings(flash_attn=fa, threads=1)
    local = completion(peer_bin, models[name], PROMPT, N_PREDICT, s)
    ours = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, rpc=refimpl_server.endpoint)
    theirs = completion(peer_bin, models[name], PROMPT, N_PREDICT, s, rpc=llama_server.endpoint)
    a_ours, a_theirs = agreement(local, ours), agreement(local, theirs)
    _results.setdefault("agreement", {})[f"{name}/{'fa' if fa else 'nofa'}"] = {
        "cpu": local, "refimpl": ours, "llama.cpp": theirs, "refimpl_agreement": a_ours,
        "llama_cpp_agreement": a_theirs}
    assert len(local) > N_PREDICT / 2
    assert a_ours >= a_theirs or a_ours >= 0.98, (
        f"refimpl agrees on {a_ours:.1%} of characters, llama.cpp's server on {a_theirs:.1%}\n"
        f"cpu:     {local!r}\nrefimpl: {ours!r}")


def teardown_module(module):
    """Keep the measurements (docs/e2e.md is written from them)."""
    out = os.environ.get("REFIMPL_E2E_REPORT")
    if out and _results:
        Path(out).write_text(json.dumps(_results, indent=1) + "\n")
