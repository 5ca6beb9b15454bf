#!/usr/bin/env bash
# The lint and type gate (configuration in pyproject.toml): ruff lint, ruff format check, mypy on the packages.
# Usage: scripts/lint.sh   (after scripts/setup.sh; `.ci/run` runs it before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
