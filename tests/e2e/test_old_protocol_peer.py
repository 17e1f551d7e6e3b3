"""Stock llama.cpp clients of older protocol versions run a small model through
``refimpl-server --protocol X.Y.Z`` and print what they print alone, within the numerics
contract's rule for greedy text (issue 7, spec/numerics.md)."""

from __future__ import annotations

import pytest

from refimpl.protocol.profiles import LATEST, SERVED
from tools.llama_runs import RunSettings, agreement, completion
from tools.models import LlamaSpec, write_llama_gguf
from tools.peers import PeerUnavailable, ensure_peers
from tools.processes import ServerProcess

pytestmark = [pytest.mark.peer, pytest.mark.slow]

#: llama-cpp-python release -> the protocol version its llama.cpp speaks: the newest release
#: of every served version before 7.0.0 (spec/versions.md); .ci/run builds these peers.
RELEASES = {p.peer_release: p.name for p in SERVED.values() if p.peer_release and p is not LATEST}
PROMPT = "the cat sat on the"
N_PREDICT = 32


def _peer_bin(request, release):
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            return ensure_peers(release)
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp peers of {release} unavailable: {exc}", pytrace=False)


@pytest.mark.parametrize("release", list(RELEASES))
def test_llama_completion_through_refimpl(request, release, tmp_path):
    protocol = RELEASES[release]
    bin_dir = _peer_bin(request, release)
    model = write_llama_gguf(tmp_path / "f32-2L.gguf",
                             LlamaSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128,
                                       seed=1))
    s = RunSettings(threads=1)
    local = completion(bin_dir, model, PROMPT, N_PREDICT, s)
    debug = {"GGML_RPC_DEBUG": "1"}
    with ServerProcess("refimpl", args=["--protocol", protocol], env=debug) as srv:
        remote = completion(bin_dir, model, PROMPT, N_PREDICT, s, rpc=srv.endpoint)
        assert srv.alive()
        log = srv.log_text()
    assert f"Starting RPC server v{protocol}" in log
    # the model really ran on the server, FREE_BUFFER and BUFFER_CLEAR with their empty replies
    for command in ("graph_compute", "set_tensor", "free_buffer", "buffer_clear"):
        assert f"commands: {command}" in log, command
    with ServerProcess("llama.cpp", bin_dir=bin_dir) as theirs:
        reference = completion(bin_dir, model, PROMPT, N_PREDICT, s, rpc=theirs.endpoint)
    assert len(local) > N_PREDICT / 2
    # the numerics contract's rule for greedy text (spec/numerics.md): at least as close to
    # the CPU run as that release's own ggml-rpc-server, or 98 % of the characters
    a_ours, a_theirs = agreement(local, remote), agreement(local, reference)
    assert a_ours >= a_theirs or a_ours >= 0.98, (
        f"refimpl agrees on {a_ours:.1%} of characters, the release's own server on "
        f"{a_theirs:.1%}\ncpu: {local!r}\nrefimpl: {remote!r}")
    # A 7.0.0 server and the older client part at HELLO.  A 4.x or 5.x client refuses the
    # server (major differs) and llama.cpp runs the model without it; a 3.x client's empty
    # HELLO is refused by the server (length), and that client aborts on the closed connection.
    with ServerProcess("refimpl", env=debug) as srv:
        if protocol.startswith("3."):
            with pytest.raises(RuntimeError, match="Remote RPC server crashed or returned "
                                                   "malformed response"):
                completion(bin_dir, model, PROMPT, N_PREDICT, s, rpc=srv.endpoint)
        else:
            completion(bin_dir, model, PROMPT, N_PREDICT, s, rpc=srv.endpoint)
        assert srv.alive()
        log = srv.log_text()
    assert "commands: alloc_buffer" not in log
    if protocol.startswith("3."):
        assert "HELLO payload must be 24 bytes, got 0" in log, log[-2000:]
    else:
        assert "commands: hello" in log
