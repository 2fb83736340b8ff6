#!/usr/bin/env bash
# tokenmill on one GPU: parity with transformers, then a Llama-3-8B-shaped random
# model, tokenmill vs transformers. Runs from the checkout (PYTHONPATH=src), no
# install, no network. Results: $OUT/results.json, $OUT/summary.md, $OUT/log.txt.
#
#   bash benchmarks/gpu/run.sh                          # on the GPU machine
#   TOKENMILL_BENCH_CPU=1 bash benchmarks/gpu/run.sh    # CPU dry run, tiny shape, < 1 min
#   bash benchmarks/gpu/run.sh --skip transformers      # extra flags go to gpu_bench.py
#
# PYTHON picks the interpreter (default: the first of python3, python, .venv/bin/python that imports
# torch); BENCH_TIMEOUT caps the whole run in seconds (default 580), a backstop
# behind the script's own step limits (500 s in all).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OUT="${OUT:-.bench/gpu}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 python .venv/bin/python; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

args=()
if [[ "${TOKENMILL_BENCH_CPU:-0}" == "1" ]]; then
  args+=(--device cpu --shape tiny)
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  head -n 15 "$OUT/nvidia-smi.txt"
fi

timeout -k 15 "${BENCH_TIMEOUT:-580}" "$PYTHON" -u benchmarks/gpu/gpu_bench.py \
  ${args[@]+"${args[@]}"} "$@" 2>&1 | tee "$OUT/log.txt"
