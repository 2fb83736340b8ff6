"""The gRPC client SDK (async and sync) against a worker served for real on a loopback port."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.grpc_worker import (
    MAX_MODEL_LEN,
    Pacer,
    Recorder,
    ServerThread,
    demo_engine,
    make_worker,
    wait_blocks_free,
)
from tokenmill.client import (
    AsyncGenerationClient,
    DeadlineExceededError,
    GenerationChunk,
    GenerationClient,
    Health,
    ModelInfo,
)
from tokenmill.client.grpc_messages import build_request
from tokenmill.engine import SamplingParams
from tokenmill.protocol.errors import APIError

PROMPT = "ROMEO:"
LONG = 200  # tokens: at least a second under PACE, so the request is still running when poked
PACE = 0.005  # seconds slept per engine step


@pytest.fixture(scope="module")
def served():
    engine = demo_engine()
    full_engine = demo_engine(max_waiting_requests=0)
    recorder = Recorder()
    engine.add_listener(recorder)
    engine.add_listener(Pacer(PACE))
    thread = ServerThread()
    try:
        addresses = {
            "open": thread.serve(make_worker(engine)),
            "keyed": thread.serve(make_worker(engine, "keyed-worker", api_key="secret")),
            "draining": thread.serve(make_worker(engine, "draining-worker", draining=True)),
            "full": thread.serve(make_worker(full_engine, "full-worker")),
        }
        yield type("Served", (), {"engine": engine, "recorder": recorder, "addresses": addresses})
    finally:
        thread.close()
        engine.shutdown()
        full_engine.shutdown()


@pytest.fixture
def address(served) -> str:
    return served.addresses["open"]


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(client: AsyncGenerationClient, prompt=PROMPT, **kw) -> list[GenerationChunk]:
    return [chunk async for chunk in client.generate(prompt, **kw)]


def greedy_text(served, max_tokens: int) -> str:
    """The oracle: the same request straight through AsyncEngine.generate."""

    async def go() -> str:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return [out async for out in served.engine.generate(PROMPT, params)][-1].outputs[0].text

    return run(go())


def test_async_client_streams_typed_chunks_equal_to_the_engine(served, address):
    async def go() -> list[GenerationChunk]:
        async with AsyncGenerationClient(address) as client:
            return await collect(client, max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)

    chunks = run(go())
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == greedy_text(served, 16) != ""
    token_ids = [t for c in chunks for choice in c.choices for t in choice.token_ids]
    assert len(token_ids) == 16
    logprobs = [lp for c in chunks for choice in c.choices for lp in choice.logprobs or []]
    assert [lp.token_id for lp in logprobs] == token_ids and all(lp.rank == 1 for lp in logprobs)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    usage = chunks[-1].usage
    assert usage is not None and (usage.completion_tokens, usage.prompt_tokens > 0) == (16, True)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[0].choices[0].finish_reason is None and chunks[0].choices[0].stop_reason is None


def test_sync_client_generates_and_answers_health_and_model_info(served, address):
    with GenerationClient(address, timeout=10) as client:
        chunks = list(client.generate(PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True))
        health = client.health()
        info = client.model_info()
        assert not client.abort("no-such-request")
    assert "".join(c.text for c in chunks) == greedy_text(served, 16) != ""
    assert chunks[0].choices[0].logprobs is None  # not asked for
    assert isinstance(health, Health) and health.serving and health.worker_id == "test-worker"
    assert info == ModelInfo("demo", MAX_MODEL_LEN, 4096, "LlamaForCausalLM", 16, 256, "test-worker")


def test_two_samples_and_a_stop_string(address):
    with GenerationClient(address, timeout=10) as client:
        chunks = list(client.generate([1, 2, 3], n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True))
        full = "".join(
            c.text for c in client.generate(PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True)
        )
        stop = next(w for w in full.split()[2:] if len(w) > 2)
        stopped = list(client.generate(PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True, stop=stop))
    finished = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [(0, "length"), (1, "length")]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.text for c in stopped) == full[: full.index(stop)]
    assert (stopped[-1].choices[0].finish_reason, stopped[-1].choices[0].stop_reason) == ("stop", stop)


def test_invalid_parameter_is_a_400_naming_the_field(address):
    with GenerationClient(address, timeout=10) as client:
        with pytest.raises(APIError) as info:
            list(client.generate(PROMPT, temperature=-1.0))
        assert (info.value.status, info.value.param, info.value.type) == (
            400,
            "temperature",
            "invalid_request_error",
        )
        assert "temperature" in info.value.message
        with pytest.raises(APIError) as info:
            list(client.generate([5] * 300))
        assert (info.value.status, info.value.param, info.value.code) == (
            400,
            "prompt",
            "context_length_exceeded",
        )
        assert "300" in info.value.message and str(MAX_MODEL_LEN) in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("inf")),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 101.0),
        ("temperature", 1e9),
        ("top_p", float("nan")),
    ],
)
def test_values_http_refuses_are_refused_over_grpc_too(address, field, value):
    """The wire carries inf and NaN; the worker answers the 400 that HTTP gives, naming the field."""
    with GenerationClient(address, timeout=10) as client, pytest.raises(APIError) as info:
        list(client.generate(PROMPT, max_tokens=2, **{field: value}))
    assert (info.value.status, info.value.param) == (400, field)
    assert info.value.message.startswith(f"{field}=")


def test_chat_content_parts_reach_the_model_as_their_text(address):
    """QA's repro: the parts' repr was 37 prompt tokens where the text is 14."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    plain = [{"role": "user", "content": "Hi"}]
    with GenerationClient(address, timeout=10) as client:
        got, want = (
            list(client.generate(messages, max_tokens=4, temperature=0.0, ignore_eos=True))
            for messages in (parts, plain)
        )
    assert got[-1].usage == want[-1].usage and "".join(c.text for c in got) == "".join(c.text for c in want)


def test_values_the_wire_cannot_carry_are_400s_before_sending():
    with pytest.raises(APIError) as info:
        build_request(PROMPT, None, None, {"max_tokens": 2**40})
    assert (info.value.status, info.value.param) == (400, "max_tokens")
    with pytest.raises(APIError) as info:
        build_request([2**40], None, None, {})
    assert (info.value.status, info.value.param) == (400, "prompt")
    with pytest.raises(APIError) as info:
        build_request(PROMPT, None, -(2**40), {})
    assert (info.value.status, info.value.param) == (400, "priority")
    with pytest.raises(TypeError, match="max_token"):
        build_request(PROMPT, None, None, {"max_token": 5})  # type: ignore[typeddict-unknown-key]
    request = build_request([4, 5], "rid", 2, {"stop": "\n", "temperature": 0.0})
    assert (list(request.stop), list(request.token_ids.ids), request.request_id, request.priority) == (
        ["\n"],
        [4, 5],
        "rid",
        2,
    )
    assert request.HasField("temperature") and not request.HasField("top_p")  # absent: the model's default


def test_errors_map_to_api_errors_with_http_statuses(served, address):
    with GenerationClient(address, timeout=10) as client, pytest.raises(APIError) as info:
        list(client.generate(PROMPT, model="gpt-17"))
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with GenerationClient(served.addresses["keyed"], api_key="wrong", timeout=10) as client:
        with pytest.raises(APIError) as info:
            list(client.generate(PROMPT, max_tokens=2))
        assert info.value.status == 401
        with pytest.raises(APIError) as info:
            client.model_info()
        assert info.value.status == 401
    with GenerationClient(served.addresses["keyed"], api_key="secret", timeout=10) as client:
        assert client.model_info().worker_id == "keyed-worker"
    with GenerationClient(served.addresses["full"], timeout=10) as client, pytest.raises(APIError) as info:
        list(client.generate(PROMPT, max_tokens=2))
    assert (info.value.status, info.value.type) == (429, "rate_limit_error")
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    with GenerationClient(served.addresses["draining"], timeout=10) as client:
        with pytest.raises(APIError) as info:
            list(client.generate(PROMPT, max_tokens=2))
        assert (info.value.status, info.value.retry_after) == (503, 1.0)
        assert not client.health().serving


def test_unreachable_worker_is_a_503():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with GenerationClient(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(APIError) as info:
        client.health()
    assert info.value.status == 503


def test_timeout_raises_deadline_exceeded_and_frees_blocks(served, address):
    with GenerationClient(address) as client, pytest.raises(DeadlineExceededError) as info:
        list(
            client.generate(PROMPT, request_id="sync-timeout", max_tokens=LONG, ignore_eos=True, timeout=0.4)
        )
    assert isinstance(info.value, TimeoutError) and info.value.status == 504
    assert served.recorder.wait("sync-timeout").outputs[0].finish_reason == "abort"
    wait_blocks_free(served.engine)

    async def go() -> None:
        async with AsyncGenerationClient(address, timeout=0.4) as client:
            await collect(client, request_id="async-timeout", max_tokens=LONG, ignore_eos=True)

    with pytest.raises(TimeoutError):
        run(go())
    assert served.recorder.wait("async-timeout").outputs[0].finish_reason == "abort"
    wait_blocks_free(served.engine)


def test_abort_from_another_call_ends_the_stream_and_frees_blocks(served, address):
    async def go() -> tuple[list[GenerationChunk], bool, bool]:
        async with AsyncGenerationClient(address, timeout=10) as client:
            stream = client.generate(PROMPT, request_id="sdk-abort", max_tokens=LONG, ignore_eos=True)
            chunks = [await anext(stream)]
            assert served.engine.stats().kv_blocks_used > 0
            aborted = await client.abort(chunks[0].request_id)
            chunks += [chunk async for chunk in stream]
            return chunks, aborted, await client.abort("sdk-abort")

    chunks, aborted, again = run(go())
    assert aborted and not again
    assert chunks[-1].choices[0].finish_reason == "abort"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < LONG
    wait_blocks_free(served.engine)


def test_leaving_the_loop_early_aborts_the_request(served, address):
    with GenerationClient(address, timeout=10) as client:
        for _ in client.generate(PROMPT, request_id="left-early", max_tokens=LONG, ignore_eos=True):
            break
    assert served.recorder.wait("left-early").outputs[0].finish_reason == "abort"
    wait_blocks_free(served.engine)


def test_priority_and_tenant_reach_the_worker(served, address, caplog):
    with (
        caplog.at_level("DEBUG", logger="tokenmill.server.grpc_service"),
        GenerationClient(address, timeout=10) as client,
    ):
        list(client.generate(PROMPT, request_id="sdk-prio", max_tokens=1, priority=5, tenant="team-b"))
    assert served.recorder.wait("sdk-prio").metrics.priority == 5
    assert any("sdk-prio" in r.getMessage() and "tenant=team-b" in r.getMessage() for r in caplog.records)
