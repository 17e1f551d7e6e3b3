"""Which servers the conformance suite judges, and how it starts them."""

from __future__ import annotations

import sys

import pytest

from support import TargetFactory


#: Flags that give a probe what it needs ("features", see support.TargetFactory).
REFIMPL_FEATURES = {
    "cache": "-c --cache-max-mib 4",
    "timeouts": "--idle-timeout 2 --read-timeout 1",
    "small-messages": "--max-message-mib 16 --max-buffered-mib 16",
}
LLAMA_FEATURES = {"cache": "-c", "timeouts": "", "small-messages": ""}


def refimpl_factory() -> TargetFactory:
    """refimpl-server as the suite starts it (1 GiB memory cap)."""
    return TargetFactory("refimpl", command=f"{sys.executable} -m refimpl.server -p {{port}} "
                                            f"-m 1024 --log-level warning",
                         kind="refimpl", feature_args=REFIMPL_FEATURES)


def llama_factory() -> TargetFactory:
    """llama.cpp 0.3.36's ggml-rpc-server, built on first use (fails if it cannot be)."""
    from refimpl.testing.peers import PeerUnavailable, ensure_peers, peer_env
    try:
        bin_dir = ensure_peers()
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp peer unavailable: {exc}", pytrace=False)
    return TargetFactory("llama.cpp 0.3.36", command=f"{bin_dir}/ggml-rpc-server -p {{port}}",
                         env={"LD_LIBRARY_PATH": peer_env(bin_dir)["LD_LIBRARY_PATH"]},
                         kind="llama.cpp", feature_args=LLAMA_FEATURES)


def factory_for(config, kind: str) -> TargetFactory:
    """The factory for one of the names ``hazard_target_kinds`` returns."""
    opt = config.getoption
    if kind == "external":
        host, _, port = opt("--server").rpartition(":")
        return TargetFactory(f"external {opt('--server')}", address=(host or "127.0.0.1", int(port)))
    if kind == "custom":
        return TargetFactory("custom", command=opt("--server-cmd"))
    if kind == "llama.cpp":
        return llama_factory()
    return refimpl_factory()


def hazard_target_kinds(config) -> list[str]:
    """Which servers the hazard probes judge: the one named by the options, or by default
    refimpl and llama.cpp 0.3.36 (the latter marked ``peer``)."""
    opt = config.getoption
    if opt("--server"):
        return ["external"]
    if opt("--server-cmd"):
        return ["custom"]
    if opt("--peer") == "llama.cpp":
        return ["llama.cpp"]
    return ["refimpl", "llama.cpp"]
