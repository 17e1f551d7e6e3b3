"""Which servers the conformance suite judges, and how it starts them."""

from __future__ import annotations

import sys

import pytest

from refimpl.protocol.profiles import LATEST, PROFILES, SERVED, Profile, served_profile
from support import TargetFactory, detect_version


#: Flags that give a probe what it needs ("features", see support.TargetFactory).
REFIMPL_FEATURES = {
    "cache": "-c --cache-max-mib 4",
    "timeouts": "--idle-timeout 2 --read-timeout 1",
    "small-messages": "--max-message-mib 16 --max-buffered-mib 16",
}
LLAMA_FEATURES = {"cache": "-c", "timeouts": "", "small-messages": ""}


def refimpl_factory(profile: Profile = LATEST) -> TargetFactory:
    """refimpl-server as the suite starts it (1 GiB memory cap), speaking ``profile``."""
    return TargetFactory("refimpl" + ("" if profile is LATEST else f" --protocol {profile.name}"),
                         command=f"{sys.executable} -m refimpl.server -p {{port}} "
                                 f"-m 1024 --log-level warning --protocol {profile.name}",
                         kind="refimpl", feature_args=REFIMPL_FEATURES, profile=profile)


def llama_factory(profile: Profile = LATEST) -> TargetFactory:
    """The ggml-rpc-server of the llama.cpp release that speaks ``profile`` (0.3.36 for
    7.0.0), built on first use (fails if it cannot be)."""
    from tools.peers import PeerUnavailable, ensure_peers, peer_env
    release = profile.peer_release
    try:
        bin_dir = ensure_peers(release)
    except PeerUnavailable as exc:
        pytest.fail(f"llama.cpp peer unavailable: {exc}", pytrace=False)
    return TargetFactory(f"llama.cpp {release}", command=f"{bin_dir}/ggml-rpc-server -p {{port}}",
                         env={"LD_LIBRARY_PATH": peer_env(bin_dir)["LD_LIBRARY_PATH"]},
                         kind="llama.cpp", feature_args=LLAMA_FEATURES, profile=profile,
                         release=release)


def external_address(config) -> tuple[str, int]:
    """The address of ``--server HOST:PORT``."""
    host, _, port = config.getoption("--server").rpartition(":")
    return host or "127.0.0.1", int(port)


def suite_profile(config) -> Profile:
    """The protocol version the suite judges (spec/versions.md).

    ``--server``: the version the server names in its HELLO reply (``--protocol``, if also
    given, must agree).  Otherwise ``--protocol`` (default 7.0.0): the servers the suite starts
    are refimpl-server speaking it and the llama.cpp release that carries it.
    """
    cached = getattr(config, "_conformance_profile", None)
    if cached is not None:
        return cached
    wanted = config.getoption("--protocol")
    try:
        chosen = served_profile(wanted) if wanted else LATEST
    except (KeyError, ValueError) as exc:
        raise pytest.UsageError(f"--protocol {wanted}: {exc.args[0]}") from None
    if config.getoption("--server"):
        address = external_address(config)
        try:
            version = detect_version(address)
        except (OSError, ValueError) as exc:
            raise pytest.UsageError(f"--server {config.getoption('--server')}: cannot learn its "
                                    f"protocol version: {exc}") from None
        name = "%d.%d.%d" % version
        if version not in SERVED:
            known = "described in spec/versions.md" if version in PROFILES else "unknown"
            raise pytest.UsageError(
                f"--server {config.getoption('--server')} speaks protocol {name} ({known}); the "
                f"suite judges " + ", ".join(p.name for p in SERVED.values()))
        if wanted and chosen.version != version:
            raise pytest.UsageError(f"--protocol {wanted}, but the server speaks {name}")
        chosen = SERVED[version]
    config._conformance_profile = chosen
    return chosen


def factory_for(config, kind: str) -> TargetFactory:
    """The factory for one of the names ``hazard_target_kinds`` returns."""
    opt = config.getoption
    profile = suite_profile(config)
    if kind == "external":
        return TargetFactory(f"external {opt('--server')} ({profile.name})",
                             address=external_address(config), profile=profile)
    if kind == "custom":
        return TargetFactory("custom", command=opt("--server-cmd"), profile=profile)
    if kind == "llama.cpp":
        return llama_factory(profile)
    return refimpl_factory(profile)


def hazard_target_kinds(config) -> list[str]:
    """Which servers the hazard probes judge: the one named by the options, or by default
    refimpl and the llama.cpp release of the suite's version (the latter marked ``peer``;
    refimpl alone for the versions no release carries)."""
    opt = config.getoption
    if opt("--server"):
        return ["external"]
    if opt("--server-cmd"):
        return ["custom"]
    no_release = not suite_profile(config).releases
    if opt("--peer") == "llama.cpp":
        if no_release:
            raise pytest.UsageError(f"--peer llama.cpp: no llama-cpp-python release carries "
                                    f"protocol {suite_profile(config).name} (spec/versions.md)")
        return ["llama.cpp"]
    # A version no release carries has no real server to run beside refimpl.
    return ["refimpl"] if no_release else ["refimpl", "llama.cpp"]


class SharedTargets:
    """Factories, and one shared running server per target kind for the checks that do not
    need a process of their own (restarted when one of them took it down)."""

    def __init__(self, config):
        self.config = config
        self.factories: dict = {}
        self.shared: dict = {}

    def make_factory(self, kind) -> TargetFactory:
        """The factory of a kind (a subclass may adjust it)."""
        return factory_for(self.config, kind)

    def factory(self, kind) -> TargetFactory:
        """The factory of a target kind (made once)."""
        if kind not in self.factories:
            self.factories[kind] = self.make_factory(kind)
        return self.factories[kind]

    def get(self, kind):
        """The shared running server of a kind, (re)started when needed."""
        t = self.shared.get(kind)
        if t is None or (t.disposable and t.proc.poll() is not None):
            if t is not None:
                t.stop()
            t = self.shared[kind] = self.factory(kind).start()
        return t

    def close(self):
        """Stop the shared servers."""
        for t in self.shared.values():
            t.stop()
