#!/usr/bin/env bash
# Install the LiteLLM proxy (the gateway peer of router_overhead.py) into its own
# git-ignored venv (.peers/litellm). No torch. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LITELLM_VENV:-$ROOT/.peers/litellm}"
VERSION="${LITELLM_VERSION:-1.108.7}"  # the version of the figures in docs/benchmarks.md

if [ -x "$VENV/bin/litellm" ] && "$VENV/bin/python" -c "import litellm.proxy.proxy_server" 2>/dev/null; then
    echo "litellm already installed in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "litellm[proxy]==$VERSION"
"$VENV/bin/python" -c "import importlib.metadata as m; print('litellm', m.version('litellm'))"
