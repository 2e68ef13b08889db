#!/usr/bin/env bash
# Set up and run the whole test suite (tiny random models + real-model smoke tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian package lists are needed to fetch the corpora shipped as .deb (apt-get download)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! apt-cache policy sword-text-web 2>/dev/null | grep -q Candidate; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
# one worker per core (pytest-xdist): most tests run on one thread (tests/conftest.py), so one process
# would leave the second core idle; worksteal evens out the few minute-long real-model tests
.venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
