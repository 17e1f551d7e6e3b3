#!/usr/bin/env bash
# Build (or reuse from cache) the real llama.cpp peers that refimpl's tests run against.
#
# Source: the llama-cpp-python sdist from PyPI, which vendors llama.cpp under vendor/llama.cpp.
# Nothing of llama.cpp is kept in this repository; sources and binaries live under the cache dir.
#
#   .ci/build-peers.sh [VERSION]          # default VERSION: 0.3.36 (protocol 7.0.0)
#
# Prints the bin directory on its last line.  Environment:
#   REFIMPL_PEERS_CACHE  cache root (default ~/.cache/refimpl-peers)
#   REFIMPL_PEERS_JOBS   parallel build jobs (default: nproc)
set -euo pipefail

version="${1:-0.3.36}"
cache="${REFIMPL_PEERS_CACHE:-$HOME/.cache/refimpl-peers}"
jobs="${REFIMPL_PEERS_JOBS:-$(nproc)}"
targets=(ggml-rpc-server llama-completion llama-perplexity llama-tokenize test-backend-ops)

# Builds use -march=native: key the build directory on the CPU's feature flags so a cache
# carried to a different CPU is rebuilt rather than crashing with SIGILL.
cpu_key=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8 || echo generic)
src_root="$cache/src"
build="$cache/build-$version-$cpu_key"
bin="$build/bin"
stamp="$build/.complete"

have_all() {
    [ -f "$stamp" ] || return 1
    for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
}

if have_all; then
    echo "peers: reusing $bin" >&2
    echo "$bin"
    exit 0
fi

mkdir -p "$src_root"
sdist="$src_root/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    echo "peers: downloading llama-cpp-python==$version sdist" >&2
    python3 -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$src_root" >&2
fi
srcdir="$src_root/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$srcdir/CMakeLists.txt" ]; then
    tar -xzf "$sdist" -C "$src_root"
fi

echo "peers: building ${targets[*]} in $build (this takes a while the first time)" >&2
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$srcdir" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF \
    -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$bin" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bin" >&2
cmake --build "$build" -j "$jobs" --target "${targets[@]}" >&2
have_all_bins=1
for t in "${targets[@]}"; do [ -x "$bin/$t" ] || { echo "peers: missing $bin/$t" >&2; have_all_bins=0; }; done
[ "$have_all_bins" = 1 ] || exit 1
touch "$stamp"
echo "$bin"
