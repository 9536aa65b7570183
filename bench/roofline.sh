#!/usr/bin/env bash
# Generation tokens/s against the memory-bandwidth limit: for each model file, the read
# bandwidth (build/bin/larder-membw, 2 threads, huge-page buffer, best of 3) right before and
# right after `larder bench -p 0 -n 128`; limit = bytes read per token / bandwidth, where the
# bytes per token are the model's tensor bytes (larder bench's model_size; for a tied model
# such as llama-3.2-1b every weight is read once per token, the embedding as the output
# matrix). This VM's bandwidth moves by up to 2x from minute to minute, hence before/after.
#   bench/roofline.sh MODEL.gguf [MODEL.gguf ...]     (THREADS=2 REPS=2 NGEN=128 by default; a short
#   NGEN keeps the window between the two bandwidth figures small)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${LARDER_BIN_DIR:-$ROOT/build/bin}"
THREADS="${THREADS:-2}"
REPS="${REPS:-2}"
NGEN="${NGEN:-128}"
bw() { "$BIN/larder-membw" -t "$THREADS" -r 3 | sed -E 's/read bandwidth: ([0-9.]+) GB.*/\1/'; }
echo "| file | GB/token | bandwidth before / after (GB/s) | limit t/s (higher bw) | Larder tg t/s | fraction of limit |"
echo "|---|---:|---:|---:|---:|---:|"
for m in "$@"; do
  b1=$(bw)
  json=$("$BIN/larder" bench -m "$m" -p 0 -n "$NGEN" -t "$THREADS" -r "$REPS" -o json)
  b2=$(bw)
  python3 - "$m" "$b1" "$b2" "$json" <<'PY'
import json, os, sys
m, b1, b2, js = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])[0]
gb = js["model_size"] / 1e9
bw = max(b1, b2)  # the stricter limit
limit = bw / gb
print(f"| {os.path.basename(m)} | {gb:.3f} | {b1:.1f} / {b2:.1f} | {limit:.1f} | {js['avg_ts']:.2f} ± {js['stddev_ts']:.2f} | {js['avg_ts'] / limit:.2f} |")
PY
done
