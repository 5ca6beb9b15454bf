#!/usr/bin/env bash
# The GPU check as one prepared command (bench/gpu_check.py holds the sections; docs/performance.md the table).
#
#   bash bench/gpu_check.sh                          # on the GPU machine, from the repository root (<= 480 s)
#   SECTIONS=streams,daemon,encoder bash bench/gpu_check.sh   # a subset (a second call on the warm machine)
#   DEVICE=cpu bash bench/gpu_check.sh               # the dry run here: tiny dims, every section, ~1 min
#   DEVICE=cpu GPU_CHECK_FAIL=rows bash bench/gpu_check.sh    # ... with one section forced to fail
#
# Needs python3 with torch and transformers (the GPU machine has both). Wheels the machine lacks (torchao,
# faster-whisper, ctranslate2: `bash scripts/gpu_wheels.sh`) are installed from .whl/ when it travelled with the
# call (carry=[".whl"]), with `pip install --no-index --no-deps --target`. Everything printed also goes to
# $OUT/console.log; $OUT (or a temporary folder) gets gpu_check.json and table.md after every section.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/console.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/gpu-check-site
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "gpu_check: installing the carried wheels failed; the sections that need them will say so"
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# the CUDA libraries pip installed with torch (nvidia/*/lib), for ctranslate2's own dlopen of cuBLAS
NV=$("$PY" -c 'import glob, os, sys; print(":".join(d for p in sys.path for d in sorted(glob.glob(os.path.join(p or ".", "nvidia", "*", "lib")))))' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ARGS=(--out "$OUT" --device "$DEVICE")
[ "$DEVICE" = cpu ] && ARGS+=(--dry-run)
[ -n "${SECTIONS:-}" ] && ARGS+=(--sections "$SECTIONS")
[ -n "${BUDGET:-}" ] && ARGS+=(--budget "$BUDGET")
"$PY" bench/gpu_check.py "${ARGS[@]}"
rc=$?
echo "gpu_check.sh: exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
