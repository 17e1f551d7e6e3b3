"""llama.cpp's own client code (libggml-rpc of the 0.3.36 build) against refimpl-server.

``peer_tools/ggml_rpc_client.py`` runs in a child process (llama.cpp's client aborts its
process on any server misbehaviour) and drives every buffer operation through ggml's backend
API.  The same run against llama.cpp's own server is the control.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.peers import peer_env
from tools.processes import ServerProcess

pytestmark = pytest.mark.peer

CLIENT = Path(__file__).parent / "peer_tools" / "ggml_rpc_client.py"


def run_llama_client(peer_bin, endpoint, *extra) -> dict:
    proc = subprocess.run([sys.executable, str(CLIENT), str(peer_bin), endpoint, *extra],
                          capture_output=True, text=True, env=peer_env(peer_bin), timeout=120)
    assert proc.returncode == 0, f"llama.cpp client failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["refimpl", "llama.cpp"])
def test_llama_cpp_client_buffer_operations(peer_bin, tmp_path, kind):
    with ServerProcess(kind, bin_dir=peer_bin if kind == "llama.cpp" else None, args=["-c"],
                       cache_dir=tmp_path) as srv:
        result = run_llama_client(peer_bin, srv.endpoint, "--big")
        assert result["failures"] == []
        assert result["alignment"] == 32
        assert result["set_get_roundtrip"] and result["copy"] and result["memset"] and result["clear"]
        assert result["big_roundtrip"]
        # The 12 MiB weight went through SET_TENSOR_HASH (miss) and SET_TENSOR with the cache
        # flag, so the server stored it:
        assert len(list((tmp_path / "rpc").iterdir())) == 1
        # A second client run hits the cache and still reads back the right bytes.
        again = run_llama_client(peer_bin, srv.endpoint, "--big")
        assert again["failures"] == [] and again["big_roundtrip"]
        assert srv.alive()


def test_refimpl_logs_the_cache_hit_of_llama_cpp_client(peer_bin, tmp_path):
    with ServerProcess("refimpl", args=["-c"], cache_dir=tmp_path,
                       env={"GGML_RPC_DEBUG": "1"}) as srv:
        run_llama_client(peer_bin, srv.endpoint, "--big")
        run_llama_client(peer_bin, srv.endpoint, "--big")
        log = srv.log_text()
    assert "-> miss" in log and "-> hit" in log
