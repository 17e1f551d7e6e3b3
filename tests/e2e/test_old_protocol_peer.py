"""A stock llama.cpp client of protocol 5.0.0 (llama-cpp-python 0.3.35) runs a small model
through ``refimpl-server --protocol 5.0.0`` and prints what it prints alone (issue 7)."""

from __future__ import annotations

import io

import pytest

from refimpl.testing.llama_runs import RunSettings, agreement, completion
from refimpl.testing.models import LlamaSpec, write_llama_gguf
from refimpl.testing.peers import PeerUnavailable, ensure_peers
from refimpl.testing.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

RELEASE, PROTOCOL = "0.3.35", "5.0.0"
PROMPT = "the cat sat on the"
N_PREDICT = 32


@pytest.fixture(scope="module")
def old_peer_bin(request):
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            return ensure_peers(RELEASE)
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp peers of {RELEASE} unavailable: {exc}", pytrace=False)


def test_llama_completion_of_5_0_0_through_refimpl(old_peer_bin, tmp_path):
    model = write_llama_gguf(tmp_path / "f32-2L.gguf",
                             LlamaSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128,
                                       seed=1))
    s = RunSettings(threads=1)
    local = completion(old_peer_bin, model, PROMPT, N_PREDICT, s)
    debug = {"GGML_RPC_DEBUG": "1"}
    with ServerProcess("refimpl", args=["--protocol", PROTOCOL], env=debug) as srv:
        remote = completion(old_peer_bin, model, PROMPT, N_PREDICT, s, rpc=srv.endpoint)
        assert srv.alive()
        log = srv.log_text()
    assert "Starting RPC server v5.0.0" in log
    # the model really ran on the server, FREE_BUFFER and BUFFER_CLEAR with their empty replies
    for command in ("graph_compute", "set_tensor", "free_buffer", "buffer_clear"):
        assert f"commands: {command}" in log, command
    assert len(local) > N_PREDICT / 2
    assert agreement(local, remote) >= 0.98, f"cpu: {local!r}\nrefimpl: {remote!r}"
    # A 7.0.0 server is refused by the 5.0.0 client (major differs): llama.cpp then runs the
    # model without it.
    with ServerProcess("refimpl", env=debug) as srv:
        completion(old_peer_bin, model, PROMPT, N_PREDICT, s, rpc=srv.endpoint)
        log = srv.log_text()
    assert "commands: hello" in log and "commands: alloc_buffer" not in log
