"""The synchronous engine: one model on one device, stepped by its caller.

``add_request`` validates and tokenizes (raising a typed error that costs
nothing else), ``step`` runs one scheduler iteration and returns the outputs of
the requests it advanced, ``abort`` frees a request wherever it is.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tokenmill.engine.attention import AttentionSpec, get_backend
from tokenmill.engine.config import EngineConfig, ModelConfig, parse_dtype
from tokenmill.engine.errors import InvalidRequestError, PromptTooLongError
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.loader import (
    generation_defaults,
    load_model,
    pack_for_device,
    resolve_model_path,
    weight_bytes,
)
from tokenmill.engine.memory import KVCachePlan, plan_kv_cache
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int


class Engine:
    """Example::

    engine = Engine(EngineConfig())          # the demo model
    engine.add_request("r1", "ROMEO:", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                print(out.outputs[0].text)
    """

    def __init__(self, config: EngineConfig | None = None):
        config = config or EngineConfig()
        config.validate()
        self.config = config
        start = time.perf_counter()
        folder = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_pretrained(folder)
        self.device = _resolve_device(config.device)
        self.dtype = self.model_config.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        self.tokenizer = Tokenizer(folder)
        self.generation_config = generation_defaults(folder)
        self.max_model_len = self._resolve_max_model_len(config.max_model_len)
        self.eos_token_ids = self._eos_token_ids()

        self.model = load_model(self.model_config, self.dtype, self.device)
        self.kv_plan: KVCachePlan = plan_kv_cache(
            self.model_config,
            self.dtype,
            self.device,
            config.block_size,
            self.max_model_len,
            config.kv_cache_memory,
            weight_bytes(self.model),
        )
        pack_for_device(self.model, self.dtype, self.device)
        spec = AttentionSpec(
            num_heads=self.model_config.num_heads,
            num_kv_heads=self.model_config.num_kv_heads,
            head_dim=self.model_config.head_dim,
            block_size=config.block_size,
            dtype=self.dtype,
            device=self.device,
            sliding_window=self.model_config.sliding_window,
        )
        backend = get_backend(config.attention_backend, spec)
        kv_caches = backend.allocate_kv_cache(self.model_config.num_layers, self.kv_plan.num_blocks)
        self.kv_cache = KVCacheManager(self.kv_plan.num_blocks, config.block_size)
        budget = config.max_num_batched_tokens or max(2048, self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, budget, self.max_model_len), self.kv_cache
        )
        self.runner = ModelRunner(self.model, self.model_config, backend, kv_caches, self.device, config.seed)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self._ids = itertools.count()
        self._sample_ids = itertools.count()
        self.startup_seconds = time.perf_counter() - start
        logger.info(
            "engine ready in %.2f s on %s (%s): %s",
            self.startup_seconds,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.kv_plan.summary(),
        )

    # -- requests ---------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults, as vLLM does."""
        g = self.generation_config
        fields: dict[str, Any] = {"max_tokens": None}
        if g.get("do_sample", False):
            fields["temperature"] = float(g.get("temperature", 1.0))
            fields["top_p"] = float(g.get("top_p", 1.0))
            fields["top_k"] = int(g.get("top_k", 0) or 0)
            if g.get("min_p") is not None:
                fields["min_p"] = float(g["min_p"])
        if g.get("repetition_penalty") is not None:
            fields["repetition_penalty"] = float(g["repetition_penalty"])
        return SamplingParams(**fields)

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError (nothing queued) on bad input."""
        if request_id is None:
            request_id = self._fresh_request_id()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", request_id, "a non-empty string")
        if request_id in self.output_processor:
            raise InvalidRequestError("request_id", request_id, "an id not already in use")
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", type(params).__name__, "a SamplingParams")
        params.validate(vocab_size=self.model_config.vocab_size)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority", priority, "an integer (higher is more important)")
        prompt_text, token_ids = self._tokenize(prompt)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            child = Request(
                # Internal ids end in a number unique to this engine, so no user id,
                # however spelled, can collide with another request's sample.
                request_id=f"{request_id}#{next(self._sample_ids)}",
                prompt_token_ids=token_ids,
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                max_tokens=min(params.max_tokens or self.max_model_len, self.max_model_len - len(token_ids)),
                priority=priority,
            )
            if arrival_time is not None:
                child.times.arrival = arrival_time
            children.append(child)
        self.output_processor.add(request_id, prompt_text, params, children)
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def _tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", prompt, "a non-empty string or list of token ids")
            token_ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(
                    "prompt_token_ids", bad[0], f"token ids in [0, {self.model_config.vocab_size})"
                )
        else:
            raise InvalidRequestError("prompt", type(prompt).__name__, "a string or a list of token ids")
        if not token_ids:
            raise InvalidRequestError("prompt", prompt, "at least one token")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len)
        return text, token_ids

    def _fresh_request_id(self) -> str:
        while True:
            request_id = f"req-{next(self._ids)}"
            if request_id not in self.output_processor:
                return request_id

    def requests_of(self, request_id: str) -> list[Request]:
        """The scheduler's requests (one per sample) behind a live request id."""
        return self.output_processor.requests_of(request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now. False if the id is unknown or done."""
        children = self.output_processor.requests_of(request_id)
        for child in children:
            self.scheduler.abort_request(child.request_id)
        self.output_processor.remove(request_id)
        return bool(children)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- stepping ---------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        result = self.runner.execute(scheduled)
        updates = self.scheduler.update_from_output(scheduled, result)
        return self.output_processor.process(updates, result.logprobs)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv_cache.num_used_blocks,
            kv_blocks_total=self.kv_cache.num_usable_blocks,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # -- set-up -------------------------------------------------------------

    def _resolve_max_model_len(self, requested: int | None) -> int:
        limit = self.model_config.max_position_embeddings
        if requested is None:
            return limit
        if requested > limit:
            raise InvalidRequestError(
                "max_model_len", requested, f"at most the model's max_position_embeddings ({limit})"
            )
        return requested

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        gen_eos = self.generation_config.get("eos_token_id")
        if gen_eos is not None:
            ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidRequestError("device", name, "auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", name, "cpu (no CUDA device is available)")
    return device
