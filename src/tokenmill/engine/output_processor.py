"""Turns the scheduler's per-step token updates into RequestOutputs.

It owns what the core does not: detokenization, stop strings (it tells the
scheduler to stop a request whose text hit one), logprob lists, and folding the
``n`` samples of a request back into one output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.engine.scheduler import Scheduler, StepUpdate
from tokenmill.engine.tokenizer import Tokenizer


@dataclass
class _Sample:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprob] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0


@dataclass
class _Tracked:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._tracked: dict[str, _Tracked] = {}
        self._sample_of: dict[str, tuple[_Tracked, int]] = {}  # child request id -> (parent, index)

    def add(
        self, request_id: str, prompt: str | None, params: SamplingParams, children: list[Request]
    ) -> None:
        tracked = _Tracked(request_id, prompt, children[0].prompt_token_ids, params)
        for i, child in enumerate(children):
            want_lp = child.sampling_params.logprobs is not None
            detok = (
                IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids, child.sampling_params)
                if self.tokenizer is not None
                else None
            )
            tracked.samples.append(_Sample(child, detok, [] if want_lp else None, 0.0 if want_lp else None))
            self._sample_of[child.request_id] = (tracked, i)
        self._tracked[request_id] = tracked

    def requests_of(self, request_id: str) -> list[Request]:
        tracked = self._tracked.get(request_id)
        return [] if tracked is None else [s.request for s in tracked.samples]

    def remove(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            for s in tracked.samples:
                self._sample_of.pop(s.request.request_id, None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark every unfinished sample aborted, stop tracking, and return the last output."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        for s in tracked.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        out = self._make_output(tracked)
        self.remove(request_id)
        return out

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def process(self, updates: list[StepUpdate], logprobs: dict[str, TokenLogprob]) -> list[RequestOutput]:
        touched: dict[str, _Tracked] = {}
        for update in updates:
            tracked, index = self._sample_of[update.request.request_id]
            sample = tracked.samples[index]
            self._apply(sample, update, logprobs.get(update.request.request_id))
            touched[tracked.request_id] = tracked
        outputs = []
        for tracked in touched.values():
            out = self._make_output(tracked)
            if out is not None:
                outputs.append(out)
            if tracked.finished:
                self.remove(tracked.request_id)
        return outputs

    def _apply(self, sample: _Sample, update: StepUpdate, logprob: TokenLogprob | None) -> None:
        req = update.request
        if logprob is not None and sample.logprobs is not None:
            sample.logprobs.append(logprob)
            sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + logprob.logprob
        if sample.detokenizer is not None:
            stop = sample.detokenizer.update(update.new_token_ids)
            if stop is not None and not update.finished:
                self.scheduler.finish_request(req.request_id, stop)
            if stop is not None:
                sample.finish_reason, sample.stop_reason = "stop", stop
                return
        if req.is_finished:
            sample.finish_reason, sample.stop_reason = req.finish_reason, req.stop_reason

    def _make_output(self, tracked: _Tracked) -> RequestOutput | None:
        kind = tracked.params.output_kind
        if kind == OutputKind.FINAL_ONLY and not tracked.finished:
            return None
        completions = []
        for i, s in enumerate(tracked.samples):
            ids = s.request.output_token_ids
            # A stop string may end the text before the last token: the tokens stay, as in vLLM.
            if kind == OutputKind.DELTA:
                text = s.detokenizer.take_new_text(s.finish_reason is not None) if s.detokenizer else ""
                token_ids = ids[s.num_tokens_sent :]
                lps = s.logprobs[s.num_tokens_sent :] if s.logprobs is not None else None
                s.num_tokens_sent = len(ids)
            else:
                text = s.detokenizer.visible_text(s.finish_reason is not None) if s.detokenizer else ""
                token_ids, lps = list(ids), (list(s.logprobs) if s.logprobs is not None else None)
            completions.append(
                CompletionOutput(
                    i, text, token_ids, s.finish_reason, s.stop_reason, lps, s.cumulative_logprob
                )
            )
        return RequestOutput(
            request_id=tracked.request_id,
            prompt=tracked.prompt,
            prompt_token_ids=tracked.prompt_token_ids,
            outputs=completions,
            finished=tracked.finished,
            metrics=_metrics(tracked),
        )


def _metrics(tracked: _Tracked) -> RequestMetrics:
    reqs = [s.request for s in tracked.samples]
    firsts = [r.times.first_token for r in reqs if r.times.first_token is not None]
    lasts = [r.times.last_token for r in reqs if r.times.last_token is not None]
    sched = [r.times.first_scheduled for r in reqs if r.times.first_scheduled is not None]
    done = [r.times.finished for r in reqs]
    return RequestMetrics(
        arrival_time=reqs[0].times.arrival,
        first_scheduled_time=min(sched) if sched else None,
        first_token_time=min(firsts) if firsts else None,
        last_token_time=max(lasts) if lasts else None,
        finished_time=max(done) if all(d is not None for d in done) else None,  # type: ignore[type-var]
        num_prompt_tokens=reqs[0].num_prompt_tokens,
        num_output_tokens=sum(r.num_output_tokens for r in reqs),
        num_preemptions=sum(r.num_preemptions for r in reqs),
        num_cached_tokens=max(0, reqs[0].num_cached_tokens),
        num_prefill_tokens=sum(r.num_prefill_tokens for r in reqs),
        num_decode_tokens=sum(r.num_decode_tokens for r in reqs),
        token_times=list(reqs[0].times.token_times),
        priority=reqs[0].priority,
    )
