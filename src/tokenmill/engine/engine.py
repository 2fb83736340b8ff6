"""The synchronous engine: one model on one device, stepped by its caller.

``add_request`` validates and tokenizes (raising a typed error that costs
nothing else), ``step`` runs one scheduler iteration and returns the outputs of
the requests it advanced, ``abort`` frees a request wherever it is. The
``AsyncEngine`` runs the same object in a background thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

import torch

from tokenmill.engine.attention import AttentionSpec, get_backend
from tokenmill.engine.clock import Clock, RealClock
from tokenmill.engine.config import EngineConfig, ModelConfig, parse_dtype
from tokenmill.engine.errors import EngineOverloadedError, InvalidRequestError
from tokenmill.engine.input_processor import InputProcessor, PreparedRequest, Prompt
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.kv_events import KVEventBatch
from tokenmill.engine.loader import (
    generation_defaults,
    load_model,
    pack_for_device,
    resolve_model_path,
    weight_bytes,
)
from tokenmill.engine.memory import KVCachePlan, check_pool_fits, plan_kv_cache
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.quantization import quantize_model
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.engine.simulated_runner import SimulatedRunner
from tokenmill.engine.stats import EngineStats, StepRecord
from tokenmill.engine.timing import ChunkSizer, OnlineTimingModel, StepShape, StepTimeRecorder, TimingModel
from tokenmill.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "Prompt"]


class Engine:
    """Example::

    engine = Engine(EngineConfig())          # the demo model
    engine.add_request("r1", "ROMEO:", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                print(out.outputs[0].text)
    """

    def __init__(self, config: EngineConfig | None = None, clock: Clock | None = None):
        config = config or EngineConfig()
        config.validate()
        self.config = config
        self.clock = clock or RealClock()
        start = time.perf_counter()
        folder = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_pretrained(folder)
        self.tokenizer = Tokenizer(folder)
        self.generation_config = generation_defaults(folder)
        self.max_model_len = self._resolve_max_model_len(config.max_model_len)
        self.tokenizer.max_model_len = self.max_model_len
        self.eos_token_ids = self._eos_token_ids()

        self.dtype = self.model_config.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        self.quantization: str | None = None  # the weights' method, once loaded (_model_runner)
        if config.runner == "simulated":
            self.device = torch.device("cpu")
            self.runner: ModelRunner | SimulatedRunner = self._simulated_runner()
        else:
            self.device = _resolve_device(config.device)
            self.runner = self._model_runner()

        self.kv_cache = KVCacheManager(
            self.kv_plan.num_blocks, config.block_size, config.enable_prefix_caching, config.kv_events
        )
        self.step_timing: StepTimeRecorder | None = None  # sees every step's shape and duration
        chunk_sizer = None
        if config.max_itl is not None:
            if isinstance(self.runner, SimulatedRunner):
                timing: TimingModel | OnlineTimingModel = self.runner.timing
            else:
                timing = self.step_timing = OnlineTimingModel(TimingModel.load(config.timing_profile))
            chunk_sizer = ChunkSizer(timing, config.max_itl, min_chunk=config.block_size)
        budget = config.max_num_batched_tokens or max(2048, self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                max_model_len=self.max_model_len,
                policy=config.scheduling_policy,
                preemption_priority_gap=config.preemption_priority_gap,
                watermark=config.kv_watermark,
            ),
            self.kv_cache,
            chunk_sizer,
            self.clock,
        )
        self.input_processor = InputProcessor(
            self.tokenizer, self.model_config, self.max_model_len, self.eos_token_ids
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self._ids = itertools.count()
        self._num_steps = 0
        self._last_step_seconds = 0.0
        self._busy_seconds = 0.0
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self.last_step: StepRecord | None = None  # the step just taken; None if it scheduled nothing
        self._finish_times: deque[float] = deque(maxlen=64)
        self._kv_event_batches: list[KVEventBatch] = []
        self.startup_seconds = time.perf_counter() - start
        logger.info(
            "engine ready in %.2f s on %s (%s%s): %s",
            self.startup_seconds,
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", simulated" if config.runner == "simulated" else "",
            self.kv_plan.summary(),
        )

    def _model_runner(self) -> ModelRunner:
        config = self.config
        self.model = load_model(self.model_config, self.dtype, self.device)
        # A checkpoint quantized beforehand runs as its method at load would: with the same head.
        loaded = self.model.checkpoint_quantization
        method = config.quantization or (loaded.method if loaded is not None else None)
        self.quantization = method
        if method is None and config.quantize_lm_head:
            raise InvalidRequestError(
                "quantize_lm_head", True, "false or None: the model is not quantized (set quantization)"
            )
        if method is not None:
            quantized = quantize_model(self.model, method, config.quantize_lm_head)
            logger.info("quantized %d linear layers to %s", quantized, method)
        self.kv_plan: KVCachePlan = plan_kv_cache(
            self.model_config,
            self.dtype,
            self.device,
            config.block_size,
            self.max_model_len,
            config.kv_cache_memory,
            weight_bytes(self.model, self.dtype, self.device),
            config.kv_cache_dtype,
        )
        check_pool_fits(config.kv_cache_memory, self.kv_plan, self.device)
        pack_for_device(self.model, self.dtype, self.device)
        spec = AttentionSpec(
            num_heads=self.model_config.num_heads,
            num_kv_heads=self.model_config.num_kv_heads,
            head_dim=self.model_config.head_dim,
            block_size=config.block_size,
            dtype=self.dtype,
            device=self.device,
            sliding_window=self.model_config.sliding_window,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        backend = get_backend(config.attention_backend, spec)
        kv_caches = backend.allocate_kv_cache(self.model_config.num_layers, self.kv_plan.num_blocks)
        return ModelRunner(self.model, self.model_config, backend, kv_caches, self.device, config.seed)

    def _simulated_runner(self) -> SimulatedRunner:
        config = self.config
        timing = TimingModel.load(config.timing_profile)
        memory = config.kv_cache_memory
        bytes_per_block = self.model_config.kv_bytes_per_token * config.block_size
        if memory is None and timing.kv_cache_tokens:
            # The profile says how many tokens of KV the real worker held.
            memory = (-(-timing.kv_cache_tokens // config.block_size) + 1) * bytes_per_block
        # With fp8 the same memory holds more tokens: the profiled worker's pool, in fp8.
        self.kv_plan = plan_kv_cache(
            self.model_config,
            self.dtype,
            self.device,
            config.block_size,
            self.max_model_len,
            memory,
            0,
            config.kv_cache_dtype,
        )
        return SimulatedRunner(timing, self.clock, self.model_config.vocab_size)

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

    def prepare_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        truncate_max_tokens: bool = True,
    ) -> PreparedRequest:
        """Validate and tokenize without touching the engine's state (safe from another thread).
        ``truncate_max_tokens``: see ``InputProcessor.prepare``."""
        if request_id is None:
            request_id = self._fresh_request_id()
        params = params if params is not None else self.default_sampling_params()
        arrival = arrival_time if arrival_time is not None else self.clock.now()
        return self.input_processor.prepare(
            request_id, prompt, params, priority, arrival, cache_salt, truncate_max_tokens
        )

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; returns its id.

        Raises InvalidRequestError on bad input and EngineOverloadedError when the
        waiting queue is full; either way nothing is queued.
        """
        prepared = self.prepare_request(request_id, prompt, params, priority, arrival_time, cache_salt)
        self.check_capacity(len(prepared.children))
        self.submit(prepared)
        return prepared.request_id

    def check_capacity(self, num_new: int, num_pending: int = 0) -> None:
        limit = self.config.max_waiting_requests
        waiting = self.scheduler.num_waiting + num_pending
        if limit is not None and waiting + num_new > limit:
            raise EngineOverloadedError(waiting, limit, self.retry_after(waiting + num_new - limit))

    def submit(self, prepared: PreparedRequest) -> None:
        """Queue a prepared request (the engine's thread only)."""
        if prepared.request_id in self.output_processor:
            raise InvalidRequestError("request_id", prepared.request_id, "an id not already in use")
        self.output_processor.add(prepared.request_id, prepared.prompt, prepared.params, prepared.children)
        for child in prepared.children:
            self.scheduler.add_request(child)

    def retry_after(self, queue_slots: int = 1) -> float:
        """Seconds until ``queue_slots`` places in the waiting queue are likely to free up,
        from the rate at which requests finished recently."""
        times = self._finish_times
        if len(times) >= 2 and times[-1] > times[0]:
            rate = (len(times) - 1) / (times[-1] - times[0])
            return min(60.0, max(0.1, queue_slots / rate))
        return 1.0

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
        return self.abort_request(request_id) is not None

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Like ``abort``, returning the request's final output (finish_reason "abort"), or None."""
        for child in self.output_processor.requests_of(request_id):
            self.scheduler.abort_request(child.request_id)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- stepping ---------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self.last_step = None
        scheduled = self.scheduler.schedule()
        start = time.perf_counter()
        result = self.runner.execute(scheduled)
        seconds = time.perf_counter() - start
        if not scheduled.is_empty:
            self._record_step(scheduled, result, seconds)
        updates = self.scheduler.update_from_output(scheduled, result)
        outputs = self.output_processor.process(updates, result.logprobs)
        now = self.clock.now()
        self._finish_times.extend(now for out in outputs if out.finished)
        self._collect_kv_events()
        return outputs

    def _record_step(self, scheduled: SchedulerOutput, result: ModelRunnerOutput, seconds: float) -> None:
        shape = StepShape.of(scheduled)
        self._num_steps += 1
        self._last_step_seconds = seconds
        self._busy_seconds += seconds
        self._num_prompt_tokens += shape.num_prefill_tokens
        self._num_generated_tokens += len(result.sampled_token_ids)
        self.last_step = StepRecord(
            seconds=seconds,
            num_scheduled_tokens=scheduled.total_num_scheduled_tokens,
            token_budget=self.scheduler.config.max_num_batched_tokens,
            num_requests=len(scheduled.num_scheduled_tokens),
            num_prompt_tokens=shape.num_prefill_tokens,
            num_generated_tokens=len(result.sampled_token_ids),
            num_decode_context_tokens=shape.decode_context_tokens,
        )
        if self.step_timing is not None:
            self.step_timing.record(shape, seconds)

    def stats(self) -> EngineStats:
        prefix = self.kv_cache.prefix_stats
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv_cache.num_used_blocks,
            kv_blocks_total=self.kv_cache.num_usable_blocks,
            num_cached_blocks=self.kv_cache.pool.num_cached,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            last_step_seconds=self._last_step_seconds,
            busy_seconds=self._busy_seconds,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens,
            max_num_seqs=self.config.max_num_seqs,
        )

    # -- prefix cache -------------------------------------------------------

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep serving their requests)."""
        self.kv_cache.reset_prefix_cache()
        self._collect_kv_events()

    def take_kv_events(self) -> list[KVEventBatch]:
        """KV events since the last call, one batch per step (needs ``EngineConfig(kv_events=True)``)."""
        batches, self._kv_event_batches = self._kv_event_batches, []
        return batches

    def _collect_kv_events(self) -> None:
        events = self.kv_cache.take_events()
        if events:
            self._kv_event_batches.append(KVEventBatch(time.time(), events))

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
