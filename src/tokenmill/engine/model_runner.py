"""Executes a SchedulerOutput: builds the step's tensors, runs the model, samples.

The runner keeps a small state per request (its tokens and block table),
created from ``NewRequestData`` and updated from ``CachedRequestData`` and its
own sampled tokens, so the scheduler never sends a request's history twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend, AttentionBatch, AttentionContext, KVCache
from tokenmill.engine.config import ModelConfig
from tokenmill.engine.sampler import Sampler, SamplingRow
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


def padded_num_tokens(n: int) -> int:
    """The step's token count rounded up to a bucket.

    oneDNN builds (and caches) a kernel per matrix shape, and the first step of
    each new token count paid ~2 ms per linear shape for it, so a server kept
    slowing down on every unseen batch size. Buckets bound the shapes to ~60;
    the padding rows cost at most 15 tokens up to 512, 63 beyond (3%).
    """
    if n <= 16:
        return n
    step = 16 if n <= 512 else 64
    return -(-n // step) * step


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


@dataclass
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    sample_ids: list[str]  # requests that sample this step
    sample_rows: torch.Tensor  # index in the flat token axis of each one's last token


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        backend: AttentionBackend,
        kv_caches: list[KVCache],
        device: torch.device,
        seed: int = 0,
    ):
        self.model = model
        self.model_config = model_config
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = backend.spec.block_size
        self.sampler = Sampler(device, seed)
        self.states: dict[str, _RequestState] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput()
        inputs = self._prepare_inputs(sched)
        meta = self.backend.prepare(inputs.batch)
        ctx = AttentionContext(self.backend, self.kv_caches, meta)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        result = ModelRunnerOutput()
        if not inputs.sample_ids:
            self._advance(sched, [])
            return result
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        rows = [
            SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.eos_token_ids)
            for s in (self.states[rid] for rid in inputs.sample_ids)
        ]
        tokens, logprobs = self.sampler(logits, rows)
        for rid, tok, lp in zip(inputs.sample_ids, tokens, logprobs, strict=True):
            result.sampled_token_ids[rid] = tok
            if lp is not None:
                result.logprobs[rid] = lp
        self._advance(sched, list(zip(inputs.sample_ids, tokens, strict=True)))
        return result

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self.states[new.request_id] = _RequestState(
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                params=new.sampling_params,
                eos_token_ids=new.eos_token_ids,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _advance(self, sched: SchedulerOutput, sampled: list[tuple[str, int]]) -> None:
        for rid, n in sched.num_scheduled_tokens.items():
            self.states[rid].num_computed_tokens += n
        for rid, tok in sampled:
            self.states[rid].token_ids.append(tok)

    def _prepare_inputs(self, sched: SchedulerOutput) -> _StepInputs:
        counts = sched.num_scheduled_tokens
        # Decodes first, shortest context first: backends batch decodes of similar
        # length into one kernel call.
        order = sorted(counts, key=lambda rid: (counts[rid] != 1, self.states[rid].num_computed_tokens))
        num_decodes = sum(1 for rid in order if counts[rid] == 1)
        ids: list[int] = []
        positions: list[int] = []
        query_start = [0]
        context_lens, seq_lens, tables = [], [], []
        sample_ids, sample_rows = [], []
        for rid in order:
            s, n = self.states[rid], counts[rid]
            start = s.num_computed_tokens
            ids.extend(s.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_start.append(query_start[-1] + n)
            context_lens.append(start)
            seq_lens.append(start + n)
            tables.append(s.block_ids)
            if start + n == len(s.token_ids):  # reached the end of what it knows: sample
                sample_ids.append(rid)
                sample_rows.append(query_start[-1] - 1)
        dev = self.device
        num_tokens = len(ids)
        pad = padded_num_tokens(num_tokens) - num_tokens if dev.type == "cpu" else 0
        pos_t = torch.tensor(positions, dtype=torch.long)
        max_blocks = max(len(t) for t in tables)
        table_t = torch.zeros((len(tables), max_blocks), dtype=torch.long)
        for i, t in enumerate(tables):
            table_t[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        req_of_token = torch.repeat_interleave(
            torch.arange(len(order)), torch.tensor([counts[r] for r in order])
        )
        slots = table_t[req_of_token, pos_t // self.block_size] * self.block_size + pos_t % self.block_size
        batch = AttentionBatch(
            num_decodes=num_decodes,
            query_start_loc=query_start,
            context_lens=context_lens,
            seq_lens=seq_lens,
            block_table=table_t.to(dev, non_blocking=True),
            slot_mapping=slots.to(dev, non_blocking=True),
        )
        return _StepInputs(
            input_ids=torch.tensor(ids + [0] * pad, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.cat([pos_t, pos_t.new_zeros(pad)]).to(dev, non_blocking=True),
            batch=batch,
            sample_ids=sample_ids,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
