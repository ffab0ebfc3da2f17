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
# The GGUF export tests run llama.cpp's own converter, unpacked once from llama-cpp-python's sdist
# into chatlora's cache folder (a second run finds it there).
.venv/bin/chatlora export --get-converter
# Two workers (pytest-xdist): much of the suite waits on process start-up, servers and subprocesses,
# which a second worker overlaps. --dist loadfile keeps each file on one worker, so a module's
# expensive fixture (the bad-input corpus, the resume reference, a server) runs once. The 20 slowest
# tests are listed at the end: CI's log shows where its minutes go.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=20 "$@"
