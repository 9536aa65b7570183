#!/usr/bin/env bash
# Side-by-side prompt/generation throughput of Larder and llama.cpp on the same GGUF
# files, same threads, one run.
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh [MODEL_DIR]   # synthesized shapes
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh real          # the real models (scripts/models)
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh FILE.gguf ... # any files
# ROUNDS=N repeats the whole list N times (alternating engines, so drift hits both alike).
# Prints one markdown table per engine (llama-bench's own output for the peer).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LARDER="${LARDER_BIN:-$ROOT/build/bin/larder}"
DIR="${1:-/tmp/larder-bench-models}"
THREADS="${THREADS:-2}"
SHAPES="${SHAPES:-stories15M stories110M llama-3.2-1b}"
TYPES="${TYPES:-f32 q8_0 q4_0 Q4_K_M}"
VOCAB="${LARDER_SHARED:-$ROOT/../shared}/tokenizers/ggml-vocab-llama-spm.gguf"
models=()
if [ "${1:-}" = real ]; then
  mapfile -t models < <("$ROOT/scripts/models")
  [ ${#models[@]} -gt 0 ] || { echo "no real model could be fetched" >&2; exit 1; }
  SHAPES=""
elif [[ "${1:-}" == *.gguf ]]; then
  models=("$@")
  SHAPES=""
else
  mkdir -p "$DIR"
fi
for s in $SHAPES; do
  base="$DIR/$s-f32.gguf"
  if [ ! -f "$base" ]; then
    extra=()
    case "$s" in stories*) [ -f "$VOCAB" ] && extra=(--vocab-from "$VOCAB");; esac
    "$LARDER" synth --shape "$s" --dtype f32 -o "$base" "${extra[@]}" >&2
  fi
  for t in $TYPES; do
    f="$DIR/$s-$t.gguf"
    [ "$t" = f32 ] || [ -f "$f" ] || "$LARDER" quantize "$base" "$f" "$t" >&2
    models+=("$f")
  done
done
for round in $(seq 1 "${ROUNDS:-1}"); do
for m in "${models[@]}"; do
  reps=3
  case "$m" in *llama-3.2-1b*) reps=2;; esac
  echo "== $m" >&2
  # Peak RSS of each whole process, measured the same way for both (GNU time, KiB).
  /usr/bin/time -f "larder peak RSS %M KiB" "$LARDER" bench -m "$m" -p 512 -n 128 -t "$THREADS" -r "$reps" 2>&1 | tail -n +3
  [ -n "${W8A8:-}" ] && case "$m" in *q8_0*) "$LARDER" bench -m "$m" -p 512 -n 0 -t "$THREADS" -r "$reps" --w8a8 | tail -n +3;; esac
  if [ -n "${LLAMA_BENCH:-}" ]; then
    /usr/bin/time -f "llama-bench peak RSS %M KiB" "$LLAMA_BENCH" -m "$m" -p 512 -n 128 -t "$THREADS" -r "$reps" 2>&1 |
      grep -E "pp512|tg128|peak RSS"
  fi
done
done
