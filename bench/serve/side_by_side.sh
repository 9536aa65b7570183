#!/usr/bin/env bash
# The issue-4 serving benchmarks, Larder and llama.cpp's server on the same GGUF, same
# threads, same parallel slots, one after the other on an otherwise idle machine:
#   LLAMA_SERVER=/path/to/llama-server bench/serve/side_by_side.sh MODEL.gguf [OUT_DIR]
# Scenarios (bench/serve/loadgen.py): shared-prefix (1,024-token system prompt + 64-token
# turns, cold vs warm TTFT), concurrent (16 clients, 16 slots), multiturn (4 chats x 8
# turns x 256 new tokens), chat (16 chat clients, own vs one shared 1,024-token system prompt;
# SCENARIOS="chat" picks). Each server is started fresh per scenario. JSON reports go to
# OUT_DIR (default /tmp/larder-serve-bench), one line per run is printed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
LARDER="${LARDER_BIN:-$ROOT/build/bin/larder}"
MODEL="${1:?usage: side_by_side.sh MODEL.gguf [OUT_DIR]}"
OUT="${2:-/tmp/larder-serve-bench}"
THREADS="${THREADS:-2}"
PORT=18731
mkdir -p "$OUT"

wait_up() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not come up" >&2
  return 1
}

run() {  # engine scenario ctx_per_slot slots loadgen-args...
  local engine=$1 scen=$2 ctx=$3 np=$4
  shift 4
  local pid
  if [ "$engine" = larder ]; then
    "$LARDER" serve -m "$MODEL" -c "$ctx" --parallel "$np" --queue 1024 -t "$THREADS" --port $PORT 2> "$OUT/$engine-$scen.log" &
  else
    [ -n "${LLAMA_SERVER:-}" ] || return 0
    "$LLAMA_SERVER" -m "$MODEL" -c $((ctx * np)) -np "$np" --metrics -t "$THREADS" --port $PORT > "$OUT/$engine-$scen.log" 2>&1 &
  fi
  pid=$!
  wait_up
  python3 "$ROOT/bench/serve/loadgen.py" --url "http://127.0.0.1:$PORT" --scenario "$scen" --json "$@" > "$OUT/$engine-$scen.json"
  kill -TERM $pid 2> /dev/null || true
  wait $pid 2> /dev/null || true
  echo "$engine $scen: $(cat "$OUT/$engine-$scen.json")"
}

for engine in larder llama; do
  for scen in ${SCENARIOS:-shared-prefix concurrent multiturn chat}; do
    case $scen in
      shared-prefix) run $engine shared-prefix 2048 1;;
      concurrent) run $engine concurrent 1024 16 --clients 16 --requests-per-client 2;;
      multiturn) run $engine multiturn 4096 4;;
      chat) run $engine chat 2048 16 --clients 16 --requests-per-client 2;;
    esac
  done
done
