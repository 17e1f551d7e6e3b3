"""Real peers of the protocol versions no ``llama-cpp-python`` release carries (3.0.0, 3.5.0,
3.6.0, 4.0.3, 5.1.0), built from the history of the ggml repository.

The ggml repository mirrors llama.cpp's ``ggml/`` directory, RPC backend included, commit by
commit.  At the commit of :data:`tools.op_tables.HISTORY` that holds a version's
default op table, it has the library's RPC server and client and ggml's own
``test-backend-ops``, but not llama.cpp's ``rpc-server`` program, so the server is started
by ``ggml_rpc_launcher.c`` (the device choice and the call into the library that
``rpc-server`` makes) and the client is ``test-backend-ops`` with the ``rpc_preload.c`` shim.
They serve one purpose: recording the committed captures of those versions
(``python -m conformance.captures.make_captures --ggml-history DIR``), which CI then replays
against refimpl.  CI does not build them: a clone of github.com/ggml-org/ggml is needed.

    python -m tools.ggml_history_peers DIR 3.0.0    # build, print the bin dir
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from refimpl.protocol.profiles import SERVED
from tools.op_tables import HISTORY
from tools.peers import PeerUnavailable, cache_root

#: Version -> the HISTORY table whose commit is built (the version's default op table).
PEER_TABLES = {p.name: p.op_table for p in SERVED.values() if p.source == "ggml"}

TARGETS = ("test-backend-ops", "ggml-rpc", "ggml-cpu")


def commit_of(version: str) -> str:
    """The ggml commit built for a version."""
    return HISTORY[PEER_TABLES[version]][1]


def ensure_ggml_peer(git_dir: Path, version: str, *, log=sys.stderr) -> Path:
    """The bin directory with ``test-backend-ops``, the libraries and ``ggml-rpc-server`` (the
    launcher) of ggml at :func:`commit_of` ``version``; built on first use."""
    commit = commit_of(version)
    build = cache_root() / f"ggml-build-{version}-{commit[:8]}"
    bin_dir, stamp = build / "bin", build / ".complete"
    if stamp.is_file():
        return bin_dir
    src = cache_root() / "ggml-src" / commit[:8]
    if not (src / "CMakeLists.txt").is_file():
        src.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as tar:
            proc = subprocess.run(["git", "-C", str(git_dir), "archive", commit], stdout=tar)
            if proc.returncode != 0:
                raise PeerUnavailable(f"{git_dir} has no commit {commit}")
            tar.seek(0)
            with tarfile.open(fileobj=tar) as t:
                t.extractall(src, filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"ggml peers: building ggml {commit[:8]} (protocol {version}) in {build}", file=log,
          flush=True)
    for cmd in (["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_RPC=ON", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON",
                 "-DGGML_BUILD_TESTS=ON", "-DGGML_BUILD_EXAMPLES=OFF",
                 f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={bin_dir}",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={bin_dir}"],
                ["cmake", "--build", str(build), "-j", "2", "--target", *TARGETS]):
        if subprocess.run(cmd, stdout=log, stderr=log).returncode != 0:
            raise PeerUnavailable(f"ggml build step failed: {' '.join(cmd[:4])} ...")
    header = (src / "include" / "ggml-rpc.h").read_text()
    with_memory = "size_t * free_mem" in header  # 3.0.0's start_server takes the memory
    launcher = Path(__file__).with_name("ggml_rpc_launcher.c")
    cmd = ["cc", "-O1", "-o", str(bin_dir / "ggml-rpc-server"), str(launcher),
           f"-I{src / 'include'}", f"-L{bin_dir}", "-lggml", "-lggml-base", "-lggml-rpc",
           f"-Wl,-rpath,{bin_dir}"] + (["-DREFIMPL_START_SERVER_WITH_MEMORY"] if with_memory else [])
    if subprocess.run(cmd, stdout=log, stderr=log).returncode != 0:
        raise PeerUnavailable("the launcher did not compile")
    stamp.touch()
    return bin_dir


def main(argv=None) -> int:
    """CLI: build one version's peer and print its bin directory."""
    p = argparse.ArgumentParser(prog="python -m tools.ggml_history_peers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("git_dir", type=Path, help="a clone of github.com/ggml-org/ggml")
    p.add_argument("version", choices=sorted(PEER_TABLES))
    args = p.parse_args(argv)
    try:
        print(ensure_ggml_peer(args.git_dir, args.version))
    except PeerUnavailable as exc:
        print(f"ggml peers: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
