"""The layers of DESIGN.md, checked: who may import whom, and that the router never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenmill"

# Torch-free parts of the engine that name a prompt's tokens and KV blocks exactly as workers do:
# the kv routing policy needs them, and they import nothing else of the engine but its errors.
ENGINE_TOKENS = ("tokenmill.engine.tokenizer", "tokenmill.engine.block_hash", "tokenmill.engine.errors")
ALLOWED = {
    "engine": ("tokenmill.engine",),
    "protocol": ("tokenmill.protocol",),
    "client": ("tokenmill.client", "tokenmill.protocol"),
    "router": ("tokenmill.router", "tokenmill.protocol", "tokenmill.client", *ENGINE_TOKENS),
    "bench": ("tokenmill.bench", "tokenmill.client", "tokenmill.protocol"),
}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "tokenmill" or name.startswith("tokenmill.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_it_may(layer):
    bad = {}
    for path in sorted((SRC / layer).rglob("*.py")):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        wrong = {m for m in imports_of(path) if not m.startswith(ALLOWED[layer]) and m != "tokenmill"}
        if wrong:
            bad[str(path.relative_to(SRC))] = sorted(wrong)
    assert not bad, f"imports across DESIGN.md's layers: {bad}"


def test_the_router_and_its_kv_policy_run_without_torch():
    code = (
        "import sys; import tokenmill.cli.main, tokenmill.cli.route, tokenmill.router.app, "
        "tokenmill.router.prompt_blocks, tokenmill.router.kv_subscriber, tokenmill.bench.runner; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
