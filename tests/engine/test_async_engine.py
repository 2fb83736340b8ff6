"""AsyncEngine on a tiny Llama: streaming, concurrency, aborts, admission limits, stats, KV events, shutdown.

Coroutines run under ``asyncio.run`` inside plain tests, each bounded by a timeout so a hang fails
instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.tiny_models import drain, random_prompts
from tokenmill.engine import (
    AllCleared,
    AsyncEngine,
    BlockStored,
    CachedBlocks,
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    ModelLoadError,
    OutputKind,
    PromptTooLongError,
    SamplingParams,
    hash_blocks,
)
from tokenmill.engine.os_thread import ENGINE_THREAD

PROMPT = "The quick brown fox"
LONG = SamplingParams(max_tokens=200, ignore_eos=True)  # runs for a few hundred steps: still live when poked


@pytest.fixture
def config(tiny_llama):
    return EngineConfig(model=str(tiny_llama), device="cpu", kv_cache_memory=1 << 22, max_model_len=256)


@pytest.fixture
def engine(config):
    engine = AsyncEngine(config)
    try:
        yield engine
    finally:
        engine.shutdown()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def delta(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, output_kind=OutputKind.DELTA, **kw)


async def collect(stream) -> list:
    return [out async for out in stream]


def joined(outs) -> tuple[str, list[int]]:
    """Text and token ids of a DELTA stream, put together."""
    return "".join(o.outputs[0].text for o in outs), [t for o in outs for t in o.outputs[0].token_ids]


def reference(config: EngineConfig, prompt, params: SamplingParams | None):
    """The synchronous engine's final output for the same request."""
    sync = Engine(config)
    if params is not None:
        params = replace(params, output_kind=OutputKind.CUMULATIVE)
    sync.add_request("ref", prompt, params)
    return drain(sync)["ref"]


def freed(engine: AsyncEngine, request_id: str):
    core = engine.engine

    def check() -> bool:
        return (
            request_id not in core.output_processor
            and core.kv_cache.num_used_blocks == 0
            and not core.has_unfinished_requests()
            and engine.stats().num_running == 0
        )

    return check


async def eventually(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"condition still false after {timeout} s"
        await asyncio.sleep(0.005)


# -- streaming -----------------------------------------------------------------------------------------


def test_delta_stream_equals_the_sync_engine(engine, config):
    params = delta(12)
    outs = run(collect(engine.generate(PROMPT, params, request_id="r")))
    assert len(outs) == 12 and all(len(o.outputs[0].token_ids) == 1 for o in outs)
    assert [o.finished for o in outs] == [False] * 11 + [True]
    assert {o.request_id for o in outs} == {"r"}
    ref = reference(config, PROMPT, params).outputs[0]
    assert joined(outs) == (ref.text, ref.token_ids)
    assert outs[-1].outputs[0].finish_reason == "length"


def test_default_params_stream_deltas_with_the_models_defaults(engine, config):
    outs = run(collect(engine.generate(PROMPT)))
    assert len(outs) > 1
    assert all(len(o.outputs[0].token_ids) == 1 for o in outs), "None must mean DELTA outputs"
    ref = reference(config, PROMPT, None).outputs[0]
    assert joined(outs) == (ref.text, ref.token_ids)
    assert outs[-1].outputs[0].finish_reason == ref.finish_reason


def test_concurrent_requests_all_finish_correctly(engine, config):
    prompts = random_prompts([3, 17, 40, 9, 25, 60, 1, 33], seed=1)
    params = [delta(4 + 3 * i) for i in range(len(prompts))]

    async def main():
        return await asyncio.gather(
            *(collect(engine.generate(p, q)) for p, q in zip(prompts, params, strict=True))
        )

    results = run(main())
    assert len({outs[0].request_id for outs in results}) == len(prompts)
    sync = Engine(config)
    for i, (p, q) in enumerate(zip(prompts, params, strict=True)):
        sync.add_request(f"ref{i}", p, replace(q, output_kind=OutputKind.CUMULATIVE))
    refs = drain(sync)
    for i, outs in enumerate(results):
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
        assert joined(outs)[1] == refs[f"ref{i}"].outputs[0].token_ids, f"request {i}"
    assert freed(engine, "")()


# -- aborts --------------------------------------------------------------------------------------------


def test_abort_returns_once_blocks_are_free(engine):
    async def main():
        stream = engine.generate(PROMPT, LONG, request_id="r")
        first = await anext(stream)
        assert not first.finished
        assert engine.engine.kv_cache.num_used_blocks > 0
        assert await engine.abort("r") is True
        assert engine.engine.kv_cache.num_used_blocks == 0
        assert not engine.engine.has_unfinished_requests()
        rest = await collect(stream)
        assert await engine.abort("r") is False
        return first, rest

    first, rest = run(main())
    last = rest[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert sum(o.finished for o in rest) == 1
    assert len(joined([first, *rest])[1]) < LONG.max_tokens


def test_abort_of_unknown_request_is_false(engine):
    assert run(engine.abort("nope")) is False


def test_leaving_the_loop_early_aborts(engine):
    async def main():
        async for _ in engine.generate(PROMPT, LONG, request_id="b"):
            break
        await eventually(freed(engine, "b"))
        assert engine.stats().num_steps < LONG.max_tokens // 2, "aborted, not run to the end"
        # The id is free again.
        outs = await collect(engine.generate(PROMPT, delta(3), request_id="b"))
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"

    run(main())


def test_closing_the_stream_aborts(engine):
    async def main():
        stream = engine.generate(PROMPT, LONG, request_id="c")
        await anext(stream)
        await stream.aclose()
        await eventually(freed(engine, "c"))
        assert engine.stats().num_steps < LONG.max_tokens // 2, "aborted, not run to the end"

    run(main())


def test_cancelling_the_consumer_aborts(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPT, LONG, request_id="t"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(freed(engine, "t"))
        assert engine.stats().num_steps < LONG.max_tokens // 2, "aborted, not run to the end"

    run(main())


# -- bad input and admission ---------------------------------------------------------------------------


def test_duplicate_live_request_id_is_refused_and_the_original_is_unaffected(engine, config):
    params = delta(20)

    async def main():
        stream = engine.generate(PROMPT, params, request_id="dup")
        first = await anext(stream)
        with pytest.raises(InvalidRequestError) as e:
            await anext(engine.generate("another prompt", delta(5), request_id="dup"))
        assert e.value.field == "request_id"
        return [first, *await collect(stream)]

    outs = run(main())
    assert outs[-1].outputs[0].finish_reason == "length"
    assert joined(outs)[1] == reference(config, PROMPT, params).outputs[0].token_ids


BAD = [
    pytest.param({"params": SamplingParams(temperature=-1)}, "temperature", id="temperature"),
    pytest.param({"params": SamplingParams(max_tokens=0)}, "max_tokens", id="max_tokens"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": []}, "prompt", id="no-tokens"),
    pytest.param({"prompt": [5, 512]}, "prompt_token_ids", id="token-out-of-vocab"),
    pytest.param({"prompt": [5] * 256}, "prompt", id="too-long"),
    pytest.param({"priority": "high"}, "priority", id="priority"),
    pytest.param({"cache_salt": ""}, "cache_salt", id="cache-salt"),
    pytest.param({"request_id": 7}, "request_id", id="request-id"),
]


@pytest.mark.parametrize(("kwargs", "field_name"), BAD)
def test_bad_input_raises_before_anything_is_queued(engine, kwargs, field_name):
    """The failed call leaves no trace: afterwards one good request under the same id is all the engine
    ever ran (its step count and prefix-cache queries say so)."""
    call = {"prompt": PROMPT, "params": delta(4), "request_id": "x", **kwargs}

    async def main():
        with pytest.raises(InvalidRequestError) as e:
            await anext(engine.generate(**call))
        assert e.value.field == field_name
        if call["prompt"] == [5] * 256:
            assert isinstance(e.value, PromptTooLongError)
        assert not engine.engine.has_unfinished_requests()
        assert engine.engine.kv_cache.num_used_blocks == 0
        outs = await collect(engine.generate(PROMPT, delta(4), request_id="x"))
        assert outs[-1].finished

    run(main())
    stats = engine.stats()
    assert stats.num_steps == 4
    assert stats.prefix_cache_queries == len(engine.engine.tokenizer.encode(PROMPT))


def test_full_waiting_queue_refuses_with_retry_after(config):
    with AsyncEngine(replace(config, max_waiting_requests=1, max_num_seqs=1)) as engine:

        async def main():
            a = engine.generate(PROMPT, delta(30), request_id="a")
            first_a = await anext(a)  # a runs
            b = asyncio.create_task(collect(engine.generate(PROMPT, delta(5), request_id="b")))
            await asyncio.sleep(0)  # b is queued behind a
            with pytest.raises(EngineOverloadedError) as e:
                await anext(engine.generate(PROMPT, delta(5), request_id="c"))
            assert e.value.retry_after > 0
            assert (e.value.num_waiting, e.value.max_waiting) == (1, 1)
            rest_a, outs_b = await collect(a), await b
            assert len(joined([first_a, *rest_a])[1]) == 30 and len(joined(outs_b)[1]) == 5
            # The queue drained: the refused id is accepted now.
            outs_c = await collect(engine.generate(PROMPT, delta(5), request_id="c"))
            assert outs_c[-1].finished and len(joined(outs_c)[1]) == 5

        run(main())


class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


class PausableEngine(Engine):
    """The real engine; a test can hold the loop thread once at the start of ``step`` or ``submit``."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._gates: dict[str, Gate] = {}

    def pause(self, where: str) -> Gate:
        gate = self._gates[where] = Gate()
        return gate

    def _hold(self, where: str) -> None:
        gate = self._gates.pop(where, None)
        if gate is not None:
            gate.entered.set()
            gate.release.wait(10)

    def step(self):
        self._hold("step")
        return super().step()

    def submit(self, prepared):
        self._hold("submit")
        super().submit(prepared)


def test_waiting_limit_holds_while_a_request_moves_into_the_queue(config):
    """A request on its way from the command queue into the scheduler still counts against
    max_waiting_requests."""
    with AsyncEngine(
        engine=PausableEngine(replace(config, max_waiting_requests=1, max_num_seqs=1))
    ) as engine:

        async def main():
            a = engine.generate(PROMPT, delta(30), request_id="a")
            await anext(a)
            gate = engine.engine.pause("submit")
            b = asyncio.create_task(collect(engine.generate(PROMPT, delta(5), request_id="b")))
            await asyncio.to_thread(gate.entered.wait, 5)  # the loop thread is handing b to the scheduler
            # Hold the loop at its next step too, so a cannot finish and let b run before c is
            # checked (on a loaded machine the check may wake that late).
            step_gate = engine.engine.pause("step")
            # Let the loop thread go on shortly, from another thread: c's admission check, which runs in
            # this one, may rightly wait for the hand-over to finish.
            threading.Timer(0.3, gate.release.set).start()
            c = asyncio.ensure_future(anext(engine.generate(PROMPT, delta(5), request_id="c")))
            try:
                with pytest.raises(EngineOverloadedError):
                    await asyncio.wait_for(c, 10)
            finally:
                step_gate.release.set()
            await collect(a)
            await b

        run(main())


def test_high_priority_request_overtakes_queued_ones(config):
    with AsyncEngine(replace(config, max_num_seqs=1)) as engine:

        async def main():
            order: list[str] = []
            running = asyncio.Event()

            async def request(rid: str, max_tokens: int, priority: int) -> None:
                async for out in engine.generate(
                    PROMPT, delta(max_tokens), request_id=rid, priority=priority
                ):
                    running.set()
                    if out.finished:
                        order.append(rid)

            low = [asyncio.create_task(request(f"low{i}", 15, 0)) for i in range(4)]
            await running.wait()  # low0 runs; the others were queued before high below
            high = asyncio.create_task(request("high", 3, 5))
            await asyncio.gather(*low, high)
            return order

        order = run(main())
    assert sorted(order) == ["high", "low0", "low1", "low2", "low3"]
    assert order.index("high") < min(order.index(f"low{i}") for i in (1, 2, 3)), order


# -- stats, metrics, KV events ---------------------------------------------------------------------------


def test_stats_after_requests_finish(engine):
    (prompt,) = random_prompts([40], seed=2)  # two full blocks of 16, and 8 tokens more

    async def main():
        first = await collect(engine.generate(prompt, delta(5)))
        s1 = engine.stats()  # stats are those of the step that finished the request
        second = await collect(engine.generate(prompt, delta(5)))
        return first, s1, second, engine.stats()

    first, s1, second, s2 = run(main())
    assert s1.num_steps == 5 and s1.kv_blocks_used == 0 and (s1.num_running, s1.num_waiting) == (0, 0)
    assert s1.kv_blocks_total == engine.engine.kv_plan.num_usable_blocks > 0
    assert (s1.prefix_cache_queries, s1.prefix_cache_hits) == (40, 0)
    assert s1.num_cached_blocks >= 2
    assert second[-1].metrics.num_cached_tokens == 32
    assert (s2.prefix_cache_queries, s2.prefix_cache_hits) == (80, 32)
    assert s2.prefix_cache_hit_rate == pytest.approx(32 / 80)
    assert s2.num_steps == 10 and s2.kv_cache_usage == 0.0 and s2.num_preemptions == 0
    assert s2.last_step_seconds > 0
    assert joined(first)[1] == joined(second)[1]


def test_final_output_carries_request_metrics(engine):
    outs = run(collect(engine.generate(PROMPT, delta(8))))
    m = outs[-1].metrics
    n_prompt = len(engine.engine.tokenizer.encode(PROMPT))
    assert m.num_prompt_tokens == n_prompt == len(outs[-1].prompt_token_ids)
    assert m.num_output_tokens == 8
    assert m.time_to_first_token > 0 and m.queue_time >= 0 and m.time_to_first_token >= m.queue_time
    assert len(m.inter_token_latencies) == m.num_output_tokens - 1
    assert all(gap >= 0 for gap in m.inter_token_latencies)
    assert m.num_prefill_tokens >= n_prompt and m.num_decode_tokens == 7
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
    assert m.last_token_time <= m.finished_time and m.e2e_latency >= m.time_to_first_token


@dataclass
class Subscriber:
    batches: list = field(default_factory=list)

    def events(self, kind) -> list:
        return [e for b in self.batches for e in b.events if isinstance(e, kind)]


def test_kv_events_reach_subscribers(config):
    (prompt,) = random_prompts([40], seed=3)
    with AsyncEngine(replace(config, kv_events=True)) as engine:

        async def main():
            sub = Subscriber()

            async def listen():
                async for batch in engine.kv_events():
                    sub.batches.append(batch)

            listener = asyncio.create_task(listen())
            await eventually(lambda: bool(sub.batches))  # subscribed: the snapshot came first
            assert sub.batches[0].events == [CachedBlocks([])]
            await collect(engine.generate(prompt, delta(3)))
            expected = hash_blocks(prompt, 16)
            await eventually(lambda: [h for e in sub.events(BlockStored) for h in e.block_hashes] == expected)
            await engine.reset_prefix_cache()
            await eventually(lambda: bool(sub.events(AllCleared)))
            listener.cancel()
            return sub

        sub = run(main())
    stored = sub.events(BlockStored)
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    assert sum(e.num_tokens for e in stored) == 32
    assert all(b.timestamp > 0 for b in sub.batches)


def test_a_late_subscriber_starts_from_what_is_cached(config):
    (prompt,) = random_prompts([40], seed=4)
    with AsyncEngine(replace(config, kv_events=True)) as engine:

        async def main():
            await collect(engine.generate(prompt, delta(2)))
            events = engine.kv_events()
            first = await events.__anext__()
            await events.aclose()
            return first

        first = run(main())
    (snapshot,) = first.events
    assert isinstance(snapshot, CachedBlocks)
    assert sorted(snapshot.block_hashes) == sorted(hash_blocks(prompt, 16))


def test_kv_events_need_the_config_flag(engine):
    async def main():
        with pytest.raises(InvalidRequestError) as e:
            await anext(engine.kv_events())
        assert e.value.field == "kv_events"

    run(main())


# -- shutdown ------------------------------------------------------------------------------------------


def test_a_model_that_cannot_load_fails_the_constructor(tmp_path):
    """The loop thread builds the engine; its error reaches the caller, and no thread is left behind."""
    before = threading.active_count()
    with pytest.raises(ModelLoadError, match="does not exist"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    assert threading.active_count() == before


def test_shutdown_ends_running_streams_and_refuses_new_work(engine):
    async def main():
        stream = engine.generate(PROMPT, LONG, request_id="r")
        await anext(stream)
        engine.shutdown()
        try:
            last = (await asyncio.wait_for(collect(stream), 5))[-1]
            assert last.finished and last.outputs[0].finish_reason == "abort"
        except EngineDeadError:
            pass
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await anext(engine.generate(PROMPT, delta(2)))
        with pytest.raises(EngineDeadError):
            await engine.abort("r")

    run(main())
    assert engine.engine.kv_cache.num_used_blocks == 0


def test_abort_racing_shutdown_does_not_hang(config):
    """An abort queued while the loop thread is inside its last step must still be answered."""
    engine = AsyncEngine(engine=PausableEngine(config))
    try:

        async def main():
            stream = engine.generate(PROMPT, LONG, request_id="r")
            await anext(stream)
            gate = engine.engine.pause("step")
            await asyncio.to_thread(gate.entered.wait, 5)
            abort = asyncio.ensure_future(engine.abort("r"))
            await asyncio.sleep(0)  # the abort command is queued
            engine.shutdown(timeout=0)  # stop, without waiting: the loop thread is held in its step
            gate.release.set()
            await asyncio.to_thread(engine.shutdown)
            try:
                assert await asyncio.wait_for(abort, 2) in (True, False)
            except EngineDeadError:
                pass
            except TimeoutError:
                pytest.fail("engine.abort() never returned: its command was dropped at shutdown")

        run(main())
    finally:
        engine.shutdown()


# -- open(): errors before any output, and listeners -----------------------------------------------


def test_open_raises_bad_input_at_once_and_queues_nothing(engine):
    async def main():
        with pytest.raises(InvalidRequestError) as e:
            engine.open(PROMPT, SamplingParams(temperature=-1))
        assert e.value.field == "temperature"
        assert engine.num_in_flight == 0
        stream = engine.open(PROMPT, delta(4))  # accepted now, streams later
        assert engine.num_in_flight == 1
        outs = [out async for out in stream]
        assert engine.num_in_flight == 0
        return outs

    outs = run(main())
    assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 4


def test_closing_an_opened_stream_aborts_and_frees(engine):
    async def main():
        stream = engine.open(PROMPT, LONG, request_id="open-close")
        await stream.__anext__()
        stream.close()
        stream.close()  # idempotent
        await eventually(freed(engine, "open-close"))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    run(main())


@dataclass
class Recorder:
    """An EngineListener that keeps what it was told."""

    steps: list = field(default_factory=list)
    finished: list = field(default_factory=list)

    def on_step(self, record, stats) -> None:
        self.steps.append((record, stats))

    def on_request_finished(self, output) -> None:
        self.finished.append(output)


def test_listeners_see_every_step_and_every_finished_request(engine):
    recorder = Recorder()
    engine.add_listener(recorder)
    (prompt,) = random_prompts([20], seed=5)

    async def main():
        await collect(engine.generate(prompt, delta(6), priority=4))
        stream = engine.open(prompt, LONG, request_id="aborted")
        await stream.__anext__()
        await engine.abort("aborted")
        stream.close()

    run(main())
    records = [r for r, _ in recorder.steps]
    assert records[0].num_prompt_tokens == 20 and records[0].num_generated_tokens == 1
    assert records[0].num_scheduled_tokens == 20 and 0 < records[0].budget_utilization <= 1
    assert all(r.seconds > 0 for r in records)
    last_stats = recorder.steps[-1][1]
    assert last_stats.busy_seconds == pytest.approx(sum(r.seconds for r in records))
    assert last_stats.num_generated_tokens == sum(r.num_generated_tokens for r in records)
    done, aborted = recorder.finished
    assert done.metrics.priority == 4 and done.outputs[0].finish_reason == "length"
    assert aborted.request_id == "aborted" and aborted.outputs[0].finish_reason == "abort"


def test_a_failing_listener_does_not_stop_serving(engine):
    class Broken:
        def on_step(self, record, stats) -> None:
            raise RuntimeError("metrics bug")

        def on_request_finished(self, output) -> None:
            raise RuntimeError("metrics bug")

    engine.add_listener(Broken())
    outs = run(collect(engine.generate(PROMPT, delta(3))))
    assert outs[-1].finished and engine.is_running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")
def test_the_step_thread_carries_the_engines_os_name(engine):
    """``top -H`` and /proc tell the engine's threads from the server's (os_thread.py)."""
    run(collect(engine.generate(PROMPT, delta(3))))  # kernels have run: torch's team exists
    names = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names[int(task.name)] = (task / "comm").read_text().strip()
    assert names[engine._thread.native_id] == ENGINE_THREAD
    assert names[threading.main_thread().native_id] != ENGINE_THREAD  # the caller's keeps its own
    assert threading.current_thread().name != ENGINE_THREAD and engine._thread.name == "tokenmill-engine-loop"
