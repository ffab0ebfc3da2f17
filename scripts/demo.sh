#!/usr/bin/env bash
# README command one: install, then train the CPU demo (SmolLM2-135M-Instruct as a pirate captain).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/chatlora train demo "$@"
