#!/usr/bin/env bash
# Set up and run the whole test suite (tiny random models + real-model smoke tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian package lists are needed to fetch the corpora shipped as .deb (apt-get download)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! apt-cache policy sword-text-web 2>/dev/null | grep -q Candidate; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
.venv/bin/python -m pytest -q "$@"
