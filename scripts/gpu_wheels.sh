#!/usr/bin/env bash
# Download the wheels the GPU check needs and the GPU machine lacks into .whl/ (git-ignored), for Python 3.12 on
# manylinux x86_64, at the versions constraints.txt pins. bench/gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target`. The machine has no network: what it needs must travel with the
# working tree (64 MiB per call, tree included), named in the call's `carry`.
#
#   bash scripts/gpu_wheels.sh            # torchao + faster-whisper + ctranslate2 (~47 MB): every gpu_check section
#   bash scripts/gpu_wheels.sh engine     # torchao only (~3.4 MB): the engine and quantized sections
#   bash scripts/gpu_wheels.sh daemon     # also av, websockets, webrtcvad-wheels, soxr, pydantic (+ core), aiohttp's
#                                         # deps missing there: the whole daemon (~90 MB: over one call's limit)
#
# Not carried by default: av (36 MB; faster-whisper imports it, but the bench decodes arrays only and stands a stub
# in for it when absent, so that ctranslate2's 43 MB fit). ctranslate2 4.8.5's CUDA build links libcublas.so.12;
# the GPU image ships CUDA 13 only, so its ASR may run on the CPU cores there (the daemon section says which).
set -euo pipefail
cd "$(dirname "$0")/.."
SET="${1:-asr}"
pin() { grep -iE "^${1//-/[-_]}==" constraints.txt | head -1 || { echo "no pin for $1 in constraints.txt" >&2; exit 1; }; }
NAMES=("$(pin torchao)")
case "$SET" in
  engine) ;;
  asr) NAMES+=("$(pin faster-whisper)" "$(pin ctranslate2)") ;;
  daemon) NAMES+=("$(pin faster-whisper)" "$(pin ctranslate2)" "$(pin av)" "$(pin websockets)" \
                  "$(pin webrtcvad-wheels)" "$(pin soxr)" "$(pin pydantic)" "$(pin pydantic-core)" \
                  "$(pin google-re2)" "$(pin sqlite-vec)" "$(pin paho-mqtt)") ;;
  *) echo "usage: $0 [engine|asr|daemon]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
rm -rf .whl && mkdir -p .whl
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_5_x86_64; do PLAT+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "${NAMES[@]}"
ls -l .whl
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: ${#NAMES[@]} wheels, ${size} MB in .whl/ (carry it: run(carry=[\".whl\"], ...))"
if [ "$size" -gt 60 ]; then echo "gpu_wheels: over 60 MB: with the tree, one call can carry at most 64 MiB" >&2; fi
