#!/usr/bin/env bash
# Install the router peers, vllm-router and sglang-router (Rust binaries in
# their wheels, no torch), into their own git-ignored venv (.peers/routers).
# Idempotent: a venv where both commands answer --help is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${ROUTERS_VENV:-$ROOT/.peers/routers}"

check() {
    "$VENV/bin/vllm-router" --help >/dev/null 2>&1 && "$VENV/bin/sglang-router" --help >/dev/null 2>&1
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "routers already installed in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q vllm-router sglang-router
check
"$VENV/bin/python" -c "import importlib.metadata as m; print('vllm-router', m.version('vllm-router'), 'sglang-router', m.version('sglang-router'))"
