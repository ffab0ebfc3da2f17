#!/usr/bin/env bash
# README command two (and CI's): install with the test tools, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest -q "$@"
