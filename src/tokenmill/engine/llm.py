"""``LLM``: offline generation in a few lines, in the spirit of ``vllm.LLM``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.input_processor import TokenizedPrompt
from tokenmill.engine.memory import KVCachePlan
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.engine.tokenizer import ChatMessage, Tokenizer

PromptInput = str | Sequence[int] | dict[str, Any] | TokenizedPrompt


class LLM:
    """A model on one device, generating for batches of prompts.

    Example::

        from tokenmill import LLM, SamplingParams

        llm = LLM()  # the embedded demo model
        out = llm.generate(["ROMEO:", "JULIET:"], SamplingParams(max_tokens=32, temperature=0.8, seed=1))
        print(out[0].outputs[0].text)

    ``model`` is a Hugging Face folder (config.json, safetensors, tokenizer.json);
    ``kv_cache_memory`` is bytes, or a fraction of the memory left after the
    weights. ``llm.kv_plan`` reports how many tokens and full-length sequences fit;
    ``kv_cache_dtype="fp8"`` stores K and V in float8 e4m3 with scales, nearly
    doubling them (``auto``: the model's dtype).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory: float | int | None = None,
        block_size: int = 16,
        attention_backend: str = "auto",
        seed: int = 0,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "priority",
        max_itl: float | None = None,
        timing_profile: str | None = None,
        quantization: str | None = None,
        quantize_lm_head: bool | None = None,
        kv_cache_dtype: str = "auto",
    ):
        self.engine = Engine(
            EngineConfig(
                model=model,
                dtype=dtype,
                device=device,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                kv_cache_memory=kv_cache_memory,
                block_size=block_size,
                attention_backend=attention_backend,
                seed=seed,
                enable_prefix_caching=enable_prefix_caching,
                scheduling_policy=scheduling_policy,
                max_itl=max_itl,
                timing_profile=timing_profile,
                quantization=quantization,
                quantize_lm_head=quantize_lm_head,
                kv_cache_dtype=kv_cache_dtype,
            )
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def kv_plan(self) -> KVCachePlan:
        return self.engine.kv_plan

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A prompt is a string, a list of token ids, a ``TokenizedPrompt`` (a text with the ids this
        model's tokenizer gave it), or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}``. One SamplingParams applies to all, or
        give one per prompt. Invalid input raises before any work is queued.
        """
        batch = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(batch))
        return self._run(batch, params, _priority_list(priority, len(batch)))

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        priority: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the model's chat template;
        ``priority`` as for ``generate``."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not (
            isinstance(conversations, list)
            and conversations
            and all(isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in conversations)
        ):
            allowed = "a list of {'role': ..., 'content': ...} dicts, or a list of such lists"
            raise InvalidRequestError("messages", messages, allowed)
        prompts: list[PromptInput] = [
            self.tokenizer.encode_chat(conv, add_generation_prompt, chat_template=chat_template)  # type: ignore[arg-type]
            for conv in conversations
        ]
        params = self._params_list(sampling_params, len(prompts))
        return self._run(prompts, params, _priority_list(priority, len(prompts)))

    def _params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        allowed = f"a SamplingParams, or a list of {n} (one per prompt)"
        if not isinstance(sampling_params, Sequence) or isinstance(sampling_params, str):
            raise InvalidRequestError("sampling_params", sampling_params, allowed)
        params = list(sampling_params)
        if not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequestError("sampling_params", sampling_params, allowed)
        if len(params) != n:
            raise InvalidRequestError(
                "sampling_params", f"<{len(params)} items>", f"one, or {n} (one per prompt)"
            )
        return params

    def _run(
        self, prompts: list[PromptInput], params: list[SamplingParams], priorities: list[int]
    ) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities, strict=True):
                final = SamplingParams(**{**p.__dict__, "output_kind": OutputKind.FINAL_ONLY})
                ids.append(engine.add_request(None, _unwrap(prompt), final, priority=prio))
        except BaseException:
            for rid in ids:  # a bad prompt costs nothing: undo the ones already queued
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:  # KeyboardInterrupt included: leave the engine clean
            for rid in ids:
                if rid not in results:
                    engine.abort(rid)
            raise
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str | dict | TokenizedPrompt):
        return [prompts]
    if not isinstance(prompts, Iterable):
        allowed = "a string, a list of token ids, a dict, a TokenizedPrompt, or a list of these"
        raise InvalidRequestError("prompts", type(prompts).__name__, allowed)
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _priority_list(priority: int | Sequence[int], n: int) -> list[int]:
    """One priority per prompt. Each value is checked where every request's is (add_request)."""
    if isinstance(priority, Sequence) and not isinstance(priority, str):
        if len(priority) != n:
            raise InvalidRequestError(
                "priority", f"<{len(priority)} items>", f"one integer, or {n} (one per prompt)"
            )
        return list(priority)
    if isinstance(priority, int) and not isinstance(priority, bool):
        return [priority] * n
    raise InvalidRequestError("priority", priority, f"an integer, or a list of {n} (one per prompt)")


def _unwrap(prompt: PromptInput) -> Any:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise InvalidRequestError("prompt", prompt, "a dict with 'prompt' or 'prompt_token_ids'")
    return prompt
