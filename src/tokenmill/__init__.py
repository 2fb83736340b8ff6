"""tokenmill: an LLM serving stack for teams that run open models on their own GPUs.

from tokenmill import LLM, SamplingParams
print(LLM().generate("ROMEO:", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from tokenmill.engine import LLM, AsyncEngine, Engine, EngineConfig, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "__version__"]
