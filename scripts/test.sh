#!/usr/bin/env bash
# README command two (and CI's): install with the test tools, then run the whole test suite
# (tests/unit, tests/e2e and tests/gpu; arguments go to pytest, e.g. `scripts/test.sh tests/unit`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
# The chat page's test drives Debian's Chromium through Playwright (Playwright's own browser download
# is not available here). Installed once; apt-get needs root, as CI runs.
if ! command -v chromium >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi
# The 20 slowest tests are listed at the end: CI's log shows where its minutes go.
exec .venv/bin/python -m pytest -q --durations=20 "$@"
