"""Build (or reuse from cache) the real llama.cpp programs refimpl is tested against.

Source: the ``llama-cpp-python`` sdist from PyPI, which vendors all of llama.cpp under
``vendor/llama.cpp``.  Sources and binaries live in a cache directory outside the repository
(``$REFIMPL_PEERS_CACHE``, default ``~/.cache/refimpl-peers``); nothing of llama.cpp is ever
copied into the repository.

    python -m tools.peers            # build 0.3.36 (protocol 7.0.0), print bin dir
    python -m tools.peers --version 0.3.36 --source   # print the source dir
    python -m tools.peers --older    # the peers of every older served protocol
    python -m tools.peers --portable # 0.3.36's ggml libraries, GGML_NATIVE=OFF
    python -m tools.peers --sse42    # the same with nothing above SSE4.2

``$REFIMPL_PEER_BIN`` overrides the whole thing with a directory of ready binaries;
``$REFIMPL_PORTABLE_LIB`` and ``$REFIMPL_SSE42_LIB`` do the same for the ggml libraries.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

#: The llama-cpp-python release whose vendored llama.cpp speaks protocol 7.0.0.
DEFAULT_VERSION = "0.3.36"

#: Programs every test run needs (of :data:`DEFAULT_VERSION`).
TARGETS = ("ggml-rpc-server", "llama-completion", "llama-perplexity", "llama-tokenize",
           "llama-quantize", "llama-bench", "test-backend-ops")

#: Programs of an older release: its RPC server and its stock client (version tests and
#: conformance of older protocol versions need no more, and each saves minutes of building).
OLD_RELEASE_TARGETS = ("ggml-rpc-server", "llama-completion")

#: Older releases are protocol peers only (their server answers small conformance graphs, their
#: client runs a tiny model): they are compiled at -O1, which takes a third less time than
#: -O3 on a cold cache and computes the same way (it still fuses multiply-adds; ggml's SIMD
#: paths are intrinsics either way).  The default release keeps CMake's Release flags: it is
#: the numerics reference and the benchmark's peer.
OLDER_RELEASE_FLAGS = ["-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG"]

#: The RPC server's CMake target was ``rpc-server`` until llama.cpp renamed it (between
#: llama-cpp-python 0.3.20 and 0.3.21).  Builds of older releases get a ``ggml-rpc-server``
#: link beside it so that every caller can use one name.
SERVER = "ggml-rpc-server"


def targets_of(version: str) -> tuple:
    """The programs :func:`ensure_peers` provides for that release."""
    return TARGETS if version == DEFAULT_VERSION else OLD_RELEASE_TARGETS


def _cmake_target(src: Path, program: str) -> str:
    """The CMake target that builds *program* in the source tree *src*."""
    if program != SERVER:
        return program
    lists = src / "tools" / "rpc" / "CMakeLists.txt"
    try:
        for line in lists.read_text().splitlines():
            if line.strip().startswith("set(TARGET "):
                return line.strip()[len("set(TARGET "):].rstrip(")").strip()
    except OSError:
        pass
    return program


class PeerUnavailable(Exception):
    """The peers could not be found or built; the message says why."""


def cache_root() -> Path:
    """Where sources and builds are kept."""
    return Path(os.environ.get("REFIMPL_PEERS_CACHE", Path.home() / ".cache" / "refimpl-peers"))


#: The ggml libraries of llama.cpp's builds for other x86-64 ISA levels (``-DGGML_NATIVE=OFF``,
#: the same machine code on every host).  The numerics contract (spec/numerics.md) measures
#: refimpl against the distance between the host's native llama.cpp and these builds: their
#: libraries are loaded in place of the native build's ones by the native build's own programs
#: (``LD_LIBRARY_PATH``), so only ggml is compiled again.
CPU_LIBS = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libggml-rpc.so")

#: Every x86 SIMD option of ggml 0.3.36 (ggml/CMakeLists.txt) above SSE4.2.
_ABOVE_SSE42 = ("AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VBMI",
                "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")


@dataclass(frozen=True)
class IsaLevel:
    """One ``-DGGML_NATIVE=OFF`` build of ggml at a fixed x86-64 ISA level."""
    describe: str          # for messages
    needs: tuple           # the /proc/cpuinfo flags its machine code uses
    cmake: tuple = ()      # options beside -DGGML_NATIVE=OFF
    env: str = ""          # names a directory of ready libraries instead of building


#: name -> level; the build lives in ``build-<version>-<name>`` of :func:`cache_root`.  Both
#: are levels llama.cpp's own x86-64 releases ship (GGML_CPU_ALL_VARIANTS: x64, sse42,
#: sandybridge, haswell, skylakex, ...).
ISA_LEVELS = {
    # ggml's defaults with GGML_NATIVE=OFF: its "haswell" variant, no AVX-512
    "portable": IsaLevel("GGML_NATIVE=OFF (SSE4.2, AVX, AVX2, BMI2, FMA, F16C)",
                         ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"),
                         env="REFIMPL_PORTABLE_LIB"),
    # its "sse42" variant: 128-bit kernels, never the native build's on any x86-64 host
    "sse42": IsaLevel("GGML_NATIVE=OFF with SSE4.2 only",
                      ("sse4_2",),
                      ("-DGGML_SSE42=ON", *(f"-DGGML_{o}=OFF" for o in _ABOVE_SSE42)),
                      env="REFIMPL_SSE42_LIB"),
}


def _cpuinfo_flags() -> str | None:
    """The ``flags`` line of /proc/cpuinfo as it stands (None when it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def _cpu_key() -> str:
    # Builds use -march=native; a cache carried to another CPU must be rebuilt, not SIGILL.
    return hashlib.md5((_cpuinfo_flags() or "generic").encode()).hexdigest()[:8]


def source_dir(version: str = DEFAULT_VERSION, *, fetch: bool = True, log=sys.stderr) -> Path:
    """The vendored llama.cpp source tree of that release (downloaded and unpacked on demand)."""
    src_root = cache_root() / "src"
    tree = src_root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    if not fetch:
        raise PeerUnavailable(f"llama.cpp source of llama-cpp-python {version} is not in {src_root}")
    src_root.mkdir(parents=True, exist_ok=True)
    sdist = src_root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        print(f"peers: downloading the llama-cpp-python=={version} sdist", file=log, flush=True)
        proc = subprocess.run(
            # the sdist of llama-cpp-python only: its build requirements (read for its
            # metadata) may come as wheels, which saves minutes per release on a cold cache
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", "llama-cpp-python",
             "--no-deps", f"llama-cpp-python=={version}", "-d", str(src_root)],
            stdout=log, stderr=log)
        if proc.returncode != 0 or not sdist.is_file():
            raise PeerUnavailable(f"could not download llama-cpp-python=={version} from PyPI")
    with tarfile.open(sdist) as tar:
        tar.extractall(src_root, filter="data")
    if not (tree / "CMakeLists.txt").is_file():
        raise PeerUnavailable(f"{sdist.name} does not vendor llama.cpp where expected")
    return tree


def build_dir(version: str = DEFAULT_VERSION) -> Path:
    """The build directory of that release on this CPU (older releases: with their -O1)."""
    suffix = "" if version == DEFAULT_VERSION else "-O1"
    return cache_root() / f"build-{version}-{_cpu_key()}{suffix}"


def _complete(bin_dir: Path, stamp: Path, targets) -> bool:
    return stamp.is_file() and all(os.access(bin_dir / t, os.X_OK) for t in targets)


def ensure_peers(version: str = DEFAULT_VERSION, *, log=sys.stderr) -> Path:
    """Return the bin directory holding every program of :func:`targets_of` that release,
    building if needed.

    Raises :class:`PeerUnavailable` when that is impossible (never returns a partial build).
    """
    targets = targets_of(version)
    override = os.environ.get("REFIMPL_PEER_BIN")
    if override:
        bin_dir = Path(override)
        missing = [t for t in targets if not os.access(bin_dir / t, os.X_OK)]
        if missing:
            raise PeerUnavailable(f"REFIMPL_PEER_BIN={bin_dir} lacks {', '.join(missing)}")
        return bin_dir
    build = build_dir(version)
    bin_dir, stamp = build / "bin", build / ".complete"
    _build_once(f"build-{version}", lambda: _complete(bin_dir, stamp, targets),
                lambda: _build(version, build, bin_dir, stamp, targets, log))
    return bin_dir


def _build_once(lock_name: str, complete, build) -> None:
    """Call ``build()`` unless ``complete()``.  One build per lock at a time: a second process
    (another test run, a parallel worker) waits for the first and then finds it complete."""
    if complete():
        return
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f"{lock_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            build()


def isa_host_problem(level: str = "portable") -> str | None:
    """Why the build of that ISA level (:data:`ISA_LEVELS`) cannot run on this host (None
    when it can)."""
    line = _cpuinfo_flags()
    if line is None:
        return "cannot read the CPU's flags from /proc/cpuinfo"
    flags = line.split()
    missing = [f for f in ISA_LEVELS[level].needs if f not in flags]
    if missing:
        return (f"this CPU lacks {', '.join(missing)}, which llama.cpp's "
                f"{ISA_LEVELS[level].describe} build needs")
    return None


def ensure_isa_libs(level: str = "portable", version: str = DEFAULT_VERSION, *,
                    log=sys.stderr) -> Path:
    """Return the directory holding :data:`CPU_LIBS` of that release built at that ISA level
    (:data:`ISA_LEVELS`), building them if needed (raises :class:`PeerUnavailable`)."""
    isa = ISA_LEVELS[level]
    override = os.environ.get(isa.env) if isa.env else None
    if override:
        lib_dir = Path(override)
        missing = [t for t in CPU_LIBS if not (lib_dir / t).is_file()]
        if missing:
            raise PeerUnavailable(f"{isa.env}={lib_dir} lacks {', '.join(missing)}")
        return lib_dir
    build = cache_root() / f"build-{version}-{level}"
    lib_dir, stamp = build / "bin", build / ".complete"
    _build_once(f"build-{version}-{level}",
                lambda: stamp.is_file() and all((lib_dir / t).is_file() for t in CPU_LIBS),
                lambda: _build(version, build, lib_dir, stamp, ("ggml", "ggml-rpc"), log,
                               native=False, extra=isa.cmake, outputs=CPU_LIBS))
    return lib_dir


def ensure_portable_libs(version: str = DEFAULT_VERSION, *, log=sys.stderr) -> Path:
    """:func:`ensure_isa_libs` of the portable (GGML_NATIVE=OFF, AVX2-level) build."""
    return ensure_isa_libs("portable", version, log=log)


def ensure_sse42_libs(version: str = DEFAULT_VERSION, *, log=sys.stderr) -> Path:
    """:func:`ensure_isa_libs` of the SSE4.2-only build (llama.cpp's "sse42" CPU variant)."""
    return ensure_isa_libs("sse42", version, log=log)


def _build(version: str, build: Path, bin_dir: Path, stamp: Path, targets, log, *,
           native: bool = True, extra=(), outputs=None) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"building the llama.cpp peers needs '{tool}' on PATH")
    src = source_dir(version, log=log)
    cmake_targets = [_cmake_target(src, t) for t in targets]
    print(f"peers: building {' '.join(cmake_targets)} of llama.cpp (llama-cpp-python {version}) in "
          f"{build}; the first build takes several minutes", file=log, flush=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake", "-S", str(src), "-B", str(build), *generator,
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
        "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
        f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={bin_dir}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={bin_dir}",
    ]
    configure += list(extra)
    if version != DEFAULT_VERSION:
        configure += OLDER_RELEASE_FLAGS
    jobs = os.environ.get("REFIMPL_PEERS_JOBS", str(os.cpu_count() or 2))
    for cmd in (configure, ["cmake", "--build", str(build), "-j", jobs, "--target", *cmake_targets]):
        proc = subprocess.run(cmd, stdout=log, stderr=log)
        if proc.returncode != 0:
            raise PeerUnavailable(f"peer build step failed ({proc.returncode}): {' '.join(cmd[:4])} ...")
    for program, target in zip(targets, cmake_targets):
        if program != target and not (bin_dir / program).exists():
            (bin_dir / program).symlink_to(target)
    missing = [t for t in (outputs or targets) if not os.access(bin_dir / t, os.X_OK)]
    if missing:
        raise PeerUnavailable(f"peer build finished without {', '.join(missing)}")
    stamp.touch()


def peer_env(bin_dir: Path) -> dict:
    """Environment for running peer programs (their shared libraries sit beside them)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(bin_dir) + (":" + env["LD_LIBRARY_PATH"]
                                             if env.get("LD_LIBRARY_PATH") else "")
    return env


def main(argv=None) -> int:
    """CLI: build or locate the peers and print the bin (or source) directory."""
    p = argparse.ArgumentParser(prog="python -m tools.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python release")
    p.add_argument("--source", action="store_true", help="print the source tree instead")
    p.add_argument("--portable", action="store_true",
                   help="build the GGML_NATIVE=OFF ggml libraries of the default release "
                        "(spec/numerics.md) and print their directory")
    p.add_argument("--sse42", action="store_true",
                   help="build the default release's ggml libraries with GGML_NATIVE=OFF and "
                        "every x86 SIMD option above SSE4.2 off (spec/numerics.md) and print "
                        "their directory")
    p.add_argument("--older", action="store_true",
                   help="build the newest release of every served protocol version before "
                        "the default's (" + ", ".join(older_releases()) + ")")
    args = p.parse_args(argv)
    versions = older_releases() if args.older else [args.version]
    levels = [level for level in ISA_LEVELS if getattr(args, level)]
    for version in versions:
        try:
            if levels:
                paths = [ensure_isa_libs(level, version) for level in levels]
            else:
                paths = [source_dir(version) if args.source else ensure_peers(version)]
        except PeerUnavailable as exc:
            print(f"peers: error: {exc}", file=sys.stderr)
            return 1
        print(*paths, sep="\n")
    return 0


def older_releases() -> list[str]:
    """The release the tests run for each served protocol version older than the default
    release's: the newest release that carries it (spec/versions.md), newest first."""
    from refimpl.protocol.profiles import SERVED
    out = [p.peer_release for p in SERVED.values()
           if p.peer_release and DEFAULT_VERSION not in p.releases]
    return sorted(out, key=lambda r: tuple(int(x) for x in r.split(".")), reverse=True)


if __name__ == "__main__":
    sys.exit(main())
