"""tokenmill: an LLM serving stack for teams that run open models on their own GPUs.

from tokenmill import LLM, SamplingParams
print(LLM().generate("ROMEO:", SamplingParams(max_tokens=32))[0].outputs[0].text)

The engine's names load on first use, so the client side (``tokenmill.client``,
``tokenmill.bench``) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tokenmill.engine import LLM, AsyncEngine, Engine, EngineConfig, RequestOutput, SamplingParams


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("tokenmill.engine"), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
