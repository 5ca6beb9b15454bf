#!/usr/bin/env bash
# Create .venv and install the project with pinned versions (CPU torch). Idempotent; ~1 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Every pip call takes the constraints: a bare `torch` would pull a CUDA build and GBs of nvidia wheels.
.venv/bin/pip install -q -c constraints.txt -e ".[dev,train,demo]"
# Browser-test tools (axe-core for the accessibility check), pinned in package-lock.json; skipped without npm.
if command -v npm >/dev/null; then npm ci --no-audit --no-fund --silent; fi
