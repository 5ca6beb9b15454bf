#!/usr/bin/env bash
# Set up and run the demo on a machine without weights: tiny random models are built locally, a test clip is
# synthesized, and `ltu-as ask` answers a question about it end to end (faster-whisper transcript included).
# The answer is meaningless: the weights are random. Usage: scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
demo=.cache/demo
[ -f "$demo/tiny/ltuas_tiny.bin" ] || .venv/bin/ltu-as make-tiny "$demo/tiny"
if [ ! -f "$demo/clip.wav" ]; then
    if command -v espeak-ng >/dev/null && command -v sox >/dev/null; then
        espeak-ng -w "$demo/speech.wav" "Someone says they will check the router while a tone beeps."
        sox -n -r 16000 "$demo/tone.wav" synth 2 sine 880 vol 0.3
        sox "$demo/speech.wav" -r 16000 -c 1 "$demo/speech16.wav"
        sox "$demo/speech16.wav" "$demo/tone.wav" "$demo/clip.wav"
    else
        .venv/bin/python -c "
import wave, numpy as np
t = np.arange(16000 * 6) / 16000
x = (0.3 * np.sin(2 * np.pi * 880 * t) * (t % 1 < 0.3) * 32767).astype('<i2')
w = wave.open('$demo/clip.wav', 'wb'); w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
w.writeframes(x.tobytes())"
    fi
fi
echo "== demo: tiny RANDOM models, so the transcript and the answer are meaningless =="
.venv/bin/ltu-as ask --audio "$demo/clip.wav" --question "${1:-What can be inferred from the audio?}" \
    --checkpoint "$demo/tiny/ltuas_tiny.bin" --whisper "$demo/tiny/whisper" --llm "$demo/tiny/llm" \
    --asr-model "$demo/tiny/whisper-ct2" --asr-beam-size 1 --asr-max-new-tokens 24 --device cpu --max-new-tokens 40
