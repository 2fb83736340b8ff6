"""SimulatedRunner: the real scheduler and KV cache on the demo model's config, a timing model instead of
the model, time on a VirtualClock."""

from __future__ import annotations

import pytest

from tests.tiny_models import drain, random_prompts
from tokenmill.engine import Engine, EngineConfig, SamplingParams, TimingModel
from tokenmill.engine.clock import VirtualClock
from tokenmill.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.engine.simulated_runner import SimulatedRunner
from tokenmill.engine.timing import StepShape

DEMO_VOCAB = 4096
START = 1000.0  # the virtual clock starts here, far from any perf_counter reading in a test run


class ShapeRecorder:
    """Sees every step's shape (engine.step_timing)."""

    def __init__(self) -> None:
        self.shapes: list[StepShape] = []

    def record(self, shape: StepShape, seconds: float) -> None:
        self.shapes.append(shape)


def simulated(clock: VirtualClock | None = None, **kwargs) -> Engine:
    return Engine(EngineConfig(runner="simulated", **kwargs), clock=clock or VirtualClock(START))


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    return random_prompts(lengths, seed=seed, vocab_size=DEMO_VOCAB)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def by_hand(
    timing: TimingModel, prefill: int = 0, decodes: int = 0, ctx: int = 0, pairs: float = 0.0
) -> float:
    """The profile's linear model, written out (independent of StepShape.of)."""
    return (
        timing.overhead_s
        + timing.per_token_s * (prefill + decodes)
        + timing.per_decode_s * decodes
        + timing.per_context_token_s * ctx
        + timing.per_attention_pair_s * pairs
    )


# -- many requests, no model -------------------------------------------------------------------------------


def test_many_requests_run_to_max_tokens_without_a_model():
    engine = simulated()
    assert isinstance(engine.runner, SimulatedRunner)
    assert not hasattr(engine, "model"), "the simulated runner must not load weights"
    lengths = [8 + (37 * i) % 200 for i in range(64)]
    for i, p in enumerate(prompts(lengths)):
        engine.add_request(f"r{i}", p, greedy(4 + i % 29))
    final = drain(engine)
    assert set(final) == {f"r{i}" for i in range(64)}
    for i in range(64):
        c = final[f"r{i}"].outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 4 + i % 29
        assert all(16 <= t < DEMO_VOCAB for t in c.token_ids)
        assert not set(c.token_ids) & engine.eos_token_ids
        assert final[f"r{i}"].metrics.num_output_tokens == len(c.token_ids)
    assert engine.kv_cache.num_used_blocks == 0 and engine.scheduler.requests == {}
    engine.step()  # the runner hears about finished requests at the next step
    assert engine.runner.states == {}


def test_text_prompts_and_default_params_work():
    engine = simulated(max_model_len=64)
    engine.add_request("r", "ROMEO:")
    out = drain(engine)["r"]
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64  # no EOS: up to max_model_len
    assert out.text  # pseudo-tokens detokenize like any others


def test_pseudo_tokens_are_deterministic_across_engines_and_batches():
    ps = prompts([5, 40, 17, 90, 33], seed=1)
    a = simulated()
    for i, p in enumerate(ps):
        a.add_request(f"r{i}", p, greedy(12))
    together = {rid: out.outputs[0].token_ids for rid, out in drain(a).items()}

    b = simulated(max_num_seqs=1, enable_prefix_caching=False)
    alone = {}
    for i in reversed(range(len(ps))):
        b.add_request(f"r{i}", ps[i], greedy(12))
        alone.update({rid: out.outputs[0].token_ids for rid, out in drain(b).items()})
    assert together == alone
    assert len({tuple(t) for t in together.values()}) == len(ps), "different prompts, different tokens"

    a.add_request("again", ps[3], greedy(12))
    assert drain(a)["again"].outputs[0].token_ids == together["r3"]


def test_pseudo_tokens_skip_end_of_sequence_ids():
    """A vocabulary of 20 leaves 4 ordinary ids (16..19); three of them EOS: every token is the fourth."""
    clock = VirtualClock()
    runner = SimulatedRunner(TimingModel(overhead_s=0.5), clock, vocab_size=20)
    eos = frozenset({16, 17, 18})
    new = NewRequestData("r", [3, 4, 5], 3, SamplingParams(), [1], 0, eos)
    out = runner.execute(SchedulerOutput(new_requests=[new], num_scheduled_tokens={"r": 3}))
    assert out.sampled_token_ids == {"r": 19}
    for n in range(4, 10):
        step = SchedulerOutput(
            cached_requests=[CachedRequestData("r", [], n - 1)], num_scheduled_tokens={"r": 1}
        )
        assert runner.execute(step).sampled_token_ids == {"r": 19}
    assert clock.now() == runner.busy_seconds == pytest.approx(7 * 0.5)


def test_partial_prefill_chunks_sample_nothing_and_empty_steps_take_no_time():
    clock = VirtualClock()
    timing = TimingModel(overhead_s=1e-3, per_token_s=1e-4)
    runner = SimulatedRunner(timing, clock, vocab_size=DEMO_VOCAB)
    assert runner.execute(SchedulerOutput()).sampled_token_ids == {}
    assert clock.now() == 0.0
    new = NewRequestData("r", list(range(20, 40)), 20, SamplingParams(), [1, 2], 0)
    first = runner.execute(SchedulerOutput(new_requests=[new], num_scheduled_tokens={"r": 12}))
    assert first.sampled_token_ids == {}
    assert clock.now() == pytest.approx(1e-3 + 12e-4)
    rest = SchedulerOutput(cached_requests=[CachedRequestData("r", [], 12)], num_scheduled_tokens={"r": 8})
    assert set(runner.execute(rest).sampled_token_ids) == {"r"}
    assert clock.now() == pytest.approx(2e-3 + 20e-4) == runner.busy_seconds
    runner.execute(SchedulerOutput(finished_request_ids={"r"}))
    assert runner.states == {}


# -- time ----------------------------------------------------------------------------------------------------


def test_virtual_clock_advances_by_the_predicted_step_times():
    clock = VirtualClock(START)
    engine = simulated(clock)
    recorder = ShapeRecorder()
    engine.step_timing = recorder
    for i, p in enumerate(prompts([30, 300, 7, 120, 64, 1000 - 64], seed=2)):
        engine.add_request(f"r{i}", p, greedy(5 + 3 * i))
    final = drain(engine)
    assert len(recorder.shapes) == engine.stats().num_steps > 0
    predicted = sum(engine.runner.timing.step_time(s) for s in recorder.shapes)
    assert clock.now() - START == pytest.approx(predicted, rel=1e-12)
    assert engine.runner.busy_seconds == pytest.approx(predicted, rel=1e-12)
    last = max(out.metrics.finished_time for out in final.values())
    assert last == pytest.approx(clock.now(), rel=1e-12)


def test_request_times_come_from_the_virtual_clock():
    """One request alone: TTFT is one prefill step, each later token one decode step of the profile."""
    clock = VirtualClock(START)
    engine = simulated(clock)
    timing = engine.runner.timing
    (prompt,) = prompts([50], seed=3)
    engine.add_request("r", prompt, greedy(6))
    m = drain(engine)["r"].metrics
    assert m.arrival_time == START and m.first_scheduled_time == START and m.queue_time == 0
    assert m.time_to_first_token == pytest.approx(by_hand(timing, prefill=50, pairs=50 * 51 / 2), rel=1e-9)
    expected = [by_hand(timing, decodes=1, ctx=50 + k) for k in range(1, 6)]
    assert m.inter_token_latencies == pytest.approx(expected, rel=1e-9)
    assert m.e2e_latency == pytest.approx(clock.now() - START)

    clock.advance_to(START + 100.0)
    engine.add_request("later", prompt, greedy(2))
    assert drain(engine)["later"].metrics.arrival_time == START + 100.0


# -- scheduling features -------------------------------------------------------------------------------------


def test_prefix_caching_in_simulation():
    clock = VirtualClock(START)
    engine = simulated(clock)
    timing = engine.runner.timing
    prefix = prompts([64], seed=4)[0]
    a, b = prompts([20, 30], seed=5)
    engine.add_request("a", prefix + a, greedy(3))
    assert drain(engine)["a"].metrics.num_cached_tokens == 0
    engine.add_request("b", prefix + b, greedy(3))
    m = drain(engine)["b"].metrics
    assert m.num_cached_tokens == 64 and m.num_prefill_tokens == 30
    # Only the 30 new tokens are computed, attending to the 64 cached ones as well.
    assert m.time_to_first_token == pytest.approx(
        by_hand(timing, prefill=30, pairs=30 * (64 + 31 / 2)), rel=1e-9
    )
    s = engine.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (84 + 94, 64)


def test_priority_in_simulation():
    """One sequence at a time: a high-priority request that arrives while four low ones wait or run
    finishes before the queued ones."""
    engine = simulated(max_num_seqs=1)
    low = prompts([40, 41, 42, 43], seed=6)
    for i, p in enumerate(low):
        engine.add_request(f"low{i}", p, greedy(10))
    engine.step()
    engine.add_request("high", prompts([44], seed=7)[0], greedy(3), priority=5)
    order = []
    while engine.has_unfinished_requests():
        order += [out.request_id for out in engine.step() if out.finished]
    assert sorted(order) == sorted([f"low{i}" for i in range(4)] + ["high"])
    assert order.index("high") < min(order.index(f"low{i}") for i in (1, 2, 3))


# -- KV capacity ---------------------------------------------------------------------------------------------


def test_kv_capacity_follows_the_default_profile():
    engine = simulated()
    tokens = TimingModel.load().kv_cache_tokens
    assert engine.kv_plan.num_tokens == tokens  # a multiple of 16 in the shipped profile
    assert engine.stats().kv_blocks_total == tokens // 16


@pytest.mark.parametrize(
    ("kv_tokens", "block_size", "blocks"), [(1000, 16, 63), (1000, 32, 32), (512, 16, 32)]
)
def test_kv_capacity_follows_a_profile(tmp_path, kv_tokens, block_size, blocks):
    path = tmp_path / "p.json"
    path.write_text(TimingModel(overhead_s=1e-3, per_token_s=1e-5, kv_cache_tokens=kv_tokens).to_json())
    engine = simulated(timing_profile=str(path), max_model_len=256, block_size=block_size)
    assert engine.kv_plan.num_usable_blocks == blocks
    assert kv_tokens <= engine.kv_plan.num_tokens < kv_tokens + block_size
    assert engine.runner.timing == TimingModel.load(path)


def test_explicit_kv_cache_memory_overrides_the_profile():
    engine = simulated(kv_cache_memory=100 * 16 * 2048)  # the demo: 2048 bytes of KV per token in bf16
    assert engine.model_config.kv_bytes_per_token == 2048
    assert engine.kv_plan.num_usable_blocks == 99


def test_small_profile_capacity_limits_concurrency(tmp_path):
    """512 tokens of KV for eight 100-token requests: they cannot all run at once, yet all finish."""
    path = tmp_path / "p.json"
    path.write_text(TimingModel(overhead_s=1e-3, per_token_s=1e-5, kv_cache_tokens=512).to_json())
    engine = simulated(timing_profile=str(path), max_model_len=256)
    for i, p in enumerate(prompts([90] * 8, seed=8)):
        engine.add_request(f"r{i}", p, greedy(10))
    most_running = 0
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step()})
        s = engine.stats()
        assert s.kv_blocks_used <= s.kv_blocks_total == 32
        most_running = max(most_running, s.num_running)
    assert 1 <= most_running <= 5
    assert all(o.finished and len(o.outputs[0].token_ids) == 10 for o in final.values()) and len(final) == 8


# -- max_itl -------------------------------------------------------------------------------------------------

MAX_ITL = 0.010


def decoders_then_long_prompt(max_itl: float | None, long_prompt: list[int], warm: list[int] | None = None):
    """Eight requests decode; then a long prompt arrives. Returns the step shapes after its arrival, the
    engine and the decoders' final outputs."""
    engine = simulated(max_itl=max_itl)
    if warm is not None:  # put a prefix into the cache first
        engine.add_request("warm", warm, greedy(1))
        drain(engine)
    for i, p in enumerate(prompts([64] * 8, seed=9)):
        engine.add_request(f"d{i}", p, greedy(120))
    while engine.stats().num_steps < 3:
        engine.step()
    assert all(r.num_output_tokens >= 1 for i in range(8) for r in engine.requests_of(f"d{i}"))
    recorder = ShapeRecorder()
    engine.step_timing = recorder
    engine.add_request("long", long_prompt, greedy(4))
    final = drain(engine)
    assert final["long"].finished and len(final["long"].outputs[0].token_ids) == 4
    return recorder.shapes, engine, final


def largest_decoder_gap(final) -> float:
    return max(max(final[f"d{i}"].metrics.inter_token_latencies) for i in range(8))


def test_max_itl_chunks_a_long_prompt_around_running_decodes():
    (long_prompt,) = prompts([900], seed=10)
    shapes, engine, final = decoders_then_long_prompt(MAX_ITL, long_prompt)
    timing = engine.runner.timing
    mixed = [s for s in shapes if s.num_decodes and s.num_prefill_tokens]
    assert len(mixed) >= 3, "the prompt should have been cut into several chunks"
    assert sum(s.num_prefill_tokens for s in shapes) == 900
    assert all(timing.step_time(s) <= MAX_ITL for s in shapes if s.num_decodes)
    assert largest_decoder_gap(final) <= MAX_ITL + 1e-9

    _, _, unbounded = decoders_then_long_prompt(None, long_prompt)
    assert largest_decoder_gap(unbounded) > 2 * MAX_ITL, "without max_itl the prompt stalls the decodes"


def test_max_itl_holds_when_the_long_prompt_hits_the_prefix_cache():
    """The arriving prompt's first 640 tokens are cached: its first chunk attends to them too, which the
    chunk size must account for."""
    cached, fresh = prompts([640, 300], seed=11)
    shapes, engine, final = decoders_then_long_prompt(MAX_ITL, cached + fresh, warm=[*cached, 7])
    assert final["long"].metrics.num_cached_tokens == 640
    timing = engine.runner.timing
    over = [(s, timing.step_time(s)) for s in shapes if s.num_decodes and timing.step_time(s) > MAX_ITL]
    assert not over, f"steps past max_itl={MAX_ITL}: {over[:3]}"
    assert largest_decoder_gap(final) <= MAX_ITL + 1e-9
