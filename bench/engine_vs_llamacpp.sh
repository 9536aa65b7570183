#!/usr/bin/env bash
# Side-by-side prompt/generation throughput of Larder and llama.cpp on the same GGUF
# files, same threads, one run.
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh [MODEL_DIR]   # synthesized shapes + real models
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh real          # the real models only (scripts/models)
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh synth [DIR]   # synthesized shapes only
#   LLAMA_BENCH=/path/to/llama-bench bench/engine_vs_llamacpp.sh FILE.gguf ... # any files
# ROUNDS=N repeats the whole list N times (alternating engines, so drift hits both alike).
# LLAMA_BENCH2: a second peer run on every file too (e.g. a newer llama.cpp that knows Gemma 3).
# KV=f16|f32|bf16|q8_0 gives both engines that KV cache type (-ctk/-ctv); unset, each its default.
# LARDER_CPU=avx2|avxvnni|avx512 picks Larder's path (the peer's comes from how it was built).
# Larder's lines say the path and what was repacked; both print peak RSS (GNU time, whole process).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LARDER="${LARDER_BIN:-$ROOT/build/bin/larder}"
REAL=1
if [ "${1:-}" = synth ]; then REAL=""; shift; fi
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
  [ -n "$REAL" ] && mapfile -t models < <("$ROOT/scripts/models" || true)
fi
kv=()
[ -n "${KV:-}" ] && kv=(-ctk "$KV" -ctv "$KV")
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
  /usr/bin/time -f "larder peak RSS %M KiB" "$LARDER" bench -m "$m" -p 512 -n 128 -t "$THREADS" -r "$reps" "${kv[@]}" 2>&1 | tail -n +3
  [ -n "${W8A8:-}" ] && case "$m" in *q8_0*) "$LARDER" bench -m "$m" -p 512 -n 0 -t "$THREADS" -r "$reps" --w8a8 | tail -n +3;; esac
  for peer in ${LLAMA_BENCH:-} ${LLAMA_BENCH2:-}; do
    /usr/bin/time -f "llama-bench peak RSS %M KiB" "$peer" -m "$m" -p 512 -n 128 -t "$THREADS" -r "$reps" "${kv[@]}" 2>&1 |
      grep -E "pp512|tg128|peak RSS|error|failed" || true
  done
done
done
