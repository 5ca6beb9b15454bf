#!/usr/bin/env bash
# The GPU check of the decode engine, as one prepared script: real LTU-AS LLM dims (random weights built on the
# device), bf16, in well under 8 minutes on one H100, printing one table (and the JSON it came from).
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   DEVICE=cpu bash bench/gpu_check.sh   # a dry run of the same script here (one real-dims layer, tiny streams)
#
# Needs only python with torch (CUDA), transformers and peft, plus torchao for the int8/int4 rows and the encoder
# row (without it those rows fail and the rest runs): it imports `ltu_as` from this tree (PYTHONPATH), and nothing
# else of the daemon. Results go to $OUT (or a temporary folder): engine.json, streams.json, table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python}"
ENGINE_ARGS=() STREAMS_ARGS=()
if [ "$DEVICE" = cpu ]; then
  ENGINE_ARGS=(--layers 1 --rows 1,2 --tokens 3 --questions 2)
  STREAMS_ARGS=(--ladder 2 --period 3)
fi
DEVICE="$DEVICE" "$PY" - <<'PY'
import os, torch, transformers, peft
cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not cuda, "no CUDA device: this check is for the GPU machine (DEVICE=cpu: dry run)"
name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {name}", flush=True)
PY
start=$(date +%s)
# engine: floor, batch 1 (ours / HF eager / HF static + compile), TTFT on a cached window, rows sweep, N questions
timeout 270 "$PY" bench/engine.py --device "$DEVICE" --quantization int8,int4 "${ENGINE_ARGS[@]}" --json "$OUT/engine.json" || echo "engine.py failed or timed out ($?)"
# the Whisper encoder in int8 against bf16: error per layer and features time of one window (needs torchao)
timeout 90 "$PY" bench/quantization.py --device "$DEVICE" --encoder-only --json "$OUT/encoder.json" \
  || echo "quantization.py --encoder-only failed or timed out ($?)"
# streams: the largest N of real-time streams with question TTFT p95 < 100 ms (2 windows per stream per trial)
timeout 200 "$PY" bench/streams.py --device "$DEVICE" --windows 2 "${STREAMS_ARGS[@]}" --json "$OUT/streams.json" \
  || echo "streams.py failed or timed out ($?)"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
def get(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
e, s, enc = get("engine.json"), get("streams.json"), get("encoder.json")
if e:
    b = e["batch1"]
    rows += [
        ("device", e["device"], ""),
        ("copy bandwidth", f'{e["copy_GBps"]} GB/s', f'weights read per step {e["weights_GB_per_step"]} GB'),
        ("batch-1 decode, ms/token", f'ours {b["ours_ms"]}', f'floor {b["floor_ms"]} (ours/floor {b["ours_vs_floor"]}); '
         f'HF eager {b["hf_eager_ms"]}; HF static+compile {b.get("hf_static_compile_ms")}'),
        ("TTFT, question on a cached window", f'{e["ttft_cached_window_ms"]} ms', ""),
    ]
    for r, x in e["rows"].items():
        rows.append((f"{r} rows, tokens/s", f'ours {x["ours_tokens_per_s"]}',
                     f'step {x["ours_step_ms"]} ms (floor {x["floor_step_ms"]}); HF eager {x.get("hf_tokens_per_s", "-")} '
                     f'(ours/HF {x.get("ours_vs_hf", "-")})'))
    q = e["questions_on_one_window"]
    rows.append((f'{q["n"]} questions on one window vs one', f'{q["ratio"]}x', f'{q["together_s"]} s vs {q["one_s"]} s'))
if s:
    rows.append(("real-time streams (scene lag < 10 s, TTFT p95 < 100 ms)", str(s["largest_real_time_streams"]),
                 "; ".join(f'{t["streams"]}: lag max {t["scene_lag_max_s"]} s, TTFT p95 {t["ttft_p95_ms"]} ms'
                           for t in s["trials"])))
if enc:
    x = enc["encoder"]
    base = next(iter(x))  # the reference: the audio path's dtype (bf16 on CUDA), written first
    if "int8" in x:
        rows.append(("Whisper encoder int8, features of one window", f'{x["int8"]["s_per_window"]} s',
                     f'{base}: {x[base]["s_per_window"]} s; weights {x["int8"]["weights_GB"]} vs {x[base]["weights_GB"]} GB; '
                     f'rel. error max {x["int8"]["rel_error_max"]}'))
table = "| what | result | detail |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
(out / "table.md").write_text(table + "\n")
print(table)
PY
echo "gpu_check: $(( $(date +%s) - start )) s; files in $OUT"
