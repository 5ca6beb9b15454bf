#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Usage: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # the vLLM server the llm.backend = "vllm" tests start (its own environment; ~3 min once)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
