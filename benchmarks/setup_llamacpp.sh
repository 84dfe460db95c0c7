#!/usr/bin/env bash
# Builds llama.cpp (llama-cpp-python 0.3.36) into its own venv for benchmarks/offline_throughput.py.
# A benchmark peer only: never a Pagoda dependency, never imported by the tests.
#
#   bash benchmarks/setup_llamacpp.sh [VENV_DIR]     (default: .venv-llamacpp beside the Makefile)
#
# Takes 10-20 minutes on 2 cores. It is built from source for this CPU, with AMX
# code generation off: a native build with AMX crashes at the first decode on
# this machine's CPU (a known llama.cpp bug; see ../shared/anchors/README.md).
set -euo pipefail

VERSION=0.3.36
VENV_DIR=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.venv-llamacpp"}

if "$VENV_DIR/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION is already in $VENV_DIR"
    exit 0
fi

python3 -m venv "$VENV_DIR"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX" \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV_DIR/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
echo "llama.cpp peer ready: $VENV_DIR"
