"""``AsyncClient`` / ``Client`` against real workers on loopback: the OpenAI surface, errors, retries
under 429, the adaptive limit, pacing, and the spread over several endpoints."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time

import pytest

from tests.client.test_http_transport import ScriptedServer
from tests.server.conftest import start_server
from tokenmill.client import APIError, AsyncClient, Client, LimitSettings
from tokenmill.client.dispatch import estimate_tokens


@pytest.fixture(scope="module")
def demo():
    worker = start_server("--worker-id", "demo-0")
    yield worker
    worker.stop()


HI = [{"role": "user", "content": "Say hi to the whole world"}]


def test_chat_and_completions_whole_and_streamed_agree(demo):
    async def run() -> None:
        async with AsyncClient(f"{demo.url}/v1") as client:
            whole = await client.chat.completions.create(messages=HI, max_tokens=12, temperature=0.0)
            stream = await client.chat.completions.create(
                messages=HI, max_tokens=12, temperature=0.0, stream=True
            )
            chunks = [c async for c in stream]
            assert "".join(c.text for c in chunks) == whole.choices[0].message.content
            assert chunks[0].choices[0].delta.role == "assistant"
            assert whole.usage is not None and whole.usage.completion_tokens == 12
            assert whole.worker == "demo-0" and chunks[-1].worker == "demo-0"
            comp = await client.completions.create(prompt="ROMEO:", max_tokens=8, temperature=0.0)
            streamed = await client.completions.create(
                prompt="ROMEO:",
                max_tokens=8,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            parts = [c async for c in streamed]
            assert "".join(p.text for p in parts) == comp.text
            assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 8

    asyncio.run(run())


def test_sync_client_and_leaving_a_stream_early_frees_the_request(demo):
    with Client(demo.url) as client:
        reply = client.chat.completions.create(messages=HI, max_tokens=4)
        assert reply.choices[0].finish_reason == "length"
        stream = client.completions.create(prompt="ROMEO:", max_tokens=400, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
    demo.wait_for(lambda: demo.metric("tokenmill_requests_running") == 0, what="the aborted request to end")


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_calls_timeout_aborts_it_on_the_worker(demo, transport, stream):
    """``timeout=`` as OpenAI's SDK takes it: the call stops, and so does the worker."""
    base = demo.grpc_target if transport == "grpc" else demo.url
    with Client(base, transport=transport) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            reply = client.completions.create(
                prompt="ROMEO:", max_tokens=900, ignore_eos=True, stream=stream, timeout=0.5
            )
            for _ in reply if stream else ():
                pass
        assert time.monotonic() - started < 5
    demo.wait_for(lambda: demo.metric("tokenmill_requests_running") == 0, what="the request to be aborted")


BAD_FIELDS = [
    {"max_tokens": -1},
    {"max_tokens": "abc"},
    {"max_tokens": math.nan},
    {"max_tokens": math.inf},
    {"max_tokens": [4]},
    {"n": "many"},
]


def test_a_bad_request_goes_to_the_server_whose_400_names_the_field_counted_under_its_worker(demo):
    """The client does not judge body fields (a local crash would not name them): the worker's
    400 does, at once, with no retry, and the failure counts under the worker that refused it."""

    async def run() -> None:
        async with AsyncClient(demo.url) as client:
            for fields in BAD_FIELDS:
                with pytest.raises(APIError) as info:
                    await client.chat.completions.create(messages=HI, **{"max_tokens": 4, **fields})
                assert info.value.status == 400 and info.value.param == next(iter(fields))
            report = client.report()
            assert report.errors_by_kind == {"client_error": len(BAD_FIELDS)}
            assert [(e.requests, e.errors) for e in report.endpoints] == [(len(BAD_FIELDS),) * 2]
            assert [(w.name, w.requests, w.errors) for w in report.workers] == [
                ("demo-0", len(BAD_FIELDS), len(BAD_FIELDS))
            ]
            assert "(no answer)" not in report.table()

    asyncio.run(run())


@pytest.mark.parametrize(
    "body",
    [*BAD_FIELDS, {"n": math.nan}, {"max_completion_tokens": "x"}, {"messages": 5}, {"messages": "hi"},
     {"prompt": {"a": 1}}, {"prompt": [[1, 2], [3]]}, {"max_tokens": True}],
)  # fmt: skip
def test_the_quota_estimate_never_raises_on_a_body_the_server_should_judge(body):
    assert estimate_tokens({"prompt": "hi", **body}) >= 1


def test_a_finished_request_is_recorded_and_its_slot_free_when_create_returns(demo):
    """Not a loop turn later: right after ``create`` (or a stream's ``aclose``) the report has it."""

    async def run() -> None:
        async with AsyncClient(demo.url) as client:
            await client.completions.create(prompt="ROMEO:", max_tokens=3)
            assert client.dispatcher.gate.in_flight == 0
            assert [e.requests for e in client.report().endpoints] == [1]
            stream = await client.completions.create(prompt="ROMEO:", max_tokens=300, stream=True)
            await stream.__anext__()
            await stream.aclose()
            assert client.dispatcher.gate.in_flight == 0
            assert [e.requests for e in client.report().endpoints] == [2]

    asyncio.run(run())
    demo.wait_for(lambda: demo.metric("tokenmill_requests_running") == 0, what="the closed stream to end")


def test_breaking_out_of_an_async_stream_aborts_it_and_frees_its_slot(demo):
    async def run() -> None:
        async with AsyncClient(demo.url, max_concurrency=1) as client:
            stream = await client.completions.create(
                prompt="ROMEO:", max_tokens=1000, ignore_eos=True, stream=True
            )
            async for _ in stream:
                break
            # The only slot comes back: this one is sent within seconds, not after 1000 tokens.
            reply = await asyncio.wait_for(client.completions.create(prompt="ROMEO:", max_tokens=2), 5)
            assert reply.usage is not None and reply.usage.completion_tokens == 2
            assert client.dispatcher.gate.in_flight == 0

    asyncio.run(run())
    demo.wait_for(lambda: demo.metric("tokenmill_requests_running") == 0, what="the stream left early to end")


def test_streamed_requests_count_their_output_tokens_in_the_report(demo):
    """The usage chunk when the stream asks for one, else one token per chunk with text."""

    async def run() -> int:
        async with AsyncClient(demo.url) as client:
            for options in ({}, {"stream_options": {"include_usage": True}}):
                stream = await client.completions.create(
                    prompt="ROMEO:", max_tokens=8, ignore_eos=True, temperature=0.0, stream=True, **options
                )
                async for _ in stream:
                    pass
            stream = await client.chat.completions.create(
                messages=HI, max_tokens=5, ignore_eos=True, temperature=0.0, stream=True
            )
            async for _ in stream:
                pass
            return client.report().workers[0].completion_tokens

    assert asyncio.run(run()) == 8 + 8 + 5


def test_a_usage_that_is_not_numbers_counts_nothing_and_the_reply_still_comes():
    """The dispatcher's books (report, quota) take such counts as 0; the reply is the caller's."""
    body = {"id": "c1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": "x", "completion_tokens": None, "total_tokens": [1]}}  # fmt: skip
    raw = json.dumps(body).encode()

    async def answer(reader, writer, n) -> None:
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
        writer.write(head.encode() + raw)

    async def run() -> None:
        async with (
            ScriptedServer(answer) as server,
            AsyncClient(server.url, tokens_per_minute=10_000) as client,
        ):
            call = client.prepare_call("/v1/completions", {"prompt": "hi", "max_tokens": 4})
            reply = await client.dispatcher.request(call)  # as a batch job sends it
            assert reply.data["usage"] == body["usage"]
            row = client.report().workers[0]
            assert (row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == (1, 0, 0, 0)

    asyncio.run(run())


def test_a_typed_reply_survives_a_servers_odd_usage():
    body = {"id": "c1", "object": "text_completion", "created": 1.7e9, "model": "m",
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": "x", "completion_tokens": 2, "total_tokens": math.nan}}  # fmt: skip
    raw = json.dumps(body).encode()

    async def answer(reader, writer, n) -> None:
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
        writer.write(head.encode() + raw)

    async def run() -> None:
        async with ScriptedServer(answer) as server, AsyncClient(server.url) as client:
            reply = await client.completions.create(model="m", prompt="hi", max_tokens=4)
            assert reply.choices[0].text == "hi" and reply.created == 1_700_000_000
            usage = reply.usage
            assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (0, 2, 2)

    asyncio.run(run())


def test_a_lone_surrogate_reaches_the_server_which_names_the_field(fleet):
    with Client(fleet[0].url) as client, pytest.raises(APIError) as refused:
        client.completions.create(model="demo", prompt="a\ud800", max_tokens=2)  # was a UnicodeEncodeError
    assert refused.value.status == 400 and refused.value.param == "prompt"


def test_retries_after_a_429_go_to_another_endpoint(fleet):
    async def busy(reader, writer, n) -> None:
        raw = b'{"error": {"message": "busy", "type": "rate_limit_error", "param": null, "code": null}}'
        head = f"HTTP/1.1 429 Too Many Requests\r\nretry-after: 5\r\ncontent-length: {len(raw)}\r\n\r\n"
        writer.write(head.encode() + raw)

    async def run() -> None:
        async with ScriptedServer(busy) as server:
            # Least in flight would pick the endpoint that answers 429 at once every time.
            async with AsyncClient([server.url, fleet[0].url], max_retries=2) as client:
                replies = await asyncio.gather(
                    *(client.completions.create(model="demo", prompt="hi", max_tokens=2) for _ in range(8))
                )
            assert len(replies) == 8 and len(server.requests) <= 2  # passed over for its Retry-After

    asyncio.run(run())


def test_429s_slow_the_client_down_and_every_request_still_succeeds():
    worker = start_server("--runner", "simulated", "--max-num-seqs", "2", "--max-waiting-requests", "1")
    try:

        async def run() -> tuple[int, dict[str, int]]:
            async with AsyncClient(worker.url, limit=LimitSettings(initial=16), max_retries=10) as client:

                async def one(i: int) -> int:
                    # A stream holds its slot until read to the end: read each in its own task.
                    stream = await client.completions.create(
                        prompt=f"p{i}", max_tokens=24, stream=True, ignore_eos=True
                    )
                    return len([c async for c in stream])

                assert all(n >= 1 for n in await asyncio.gather(*(one(i) for i in range(40))))
                return client.concurrency_limit, client.report().errors_by_kind

        limit, errors = asyncio.run(run())
        assert errors.get("rate_limited", 0) > 0  # the worker's queue did overflow at first
        assert limit < 16
    finally:
        worker.stop()


def test_the_adaptive_limit_settles_near_the_fleets_slots(fleet):
    """16 slots in all: the limit must grow past its start of 4 and not run away past 2x."""

    async def run() -> int:
        async with AsyncClient([w.url for w in fleet]) as client:

            async def one(i: int) -> None:
                stream = await client.completions.create(
                    prompt=f"q{i}", max_tokens=48, ignore_eos=True, stream=True
                )
                async for _ in stream:
                    pass

            await asyncio.gather(*(one(i) for i in range(400)))
            return client.concurrency_limit

    limit = asyncio.run(run())
    assert 8 <= limit <= 32, limit


def test_requests_spread_over_endpoints_counts_match_the_workers_and_a_dead_one_is_ejected(fleet):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = [w.metric("tokenmill_requests_total") for w in fleet]

    async def run():
        async with AsyncClient([fleet[0].url, fleet[1].url, dead], max_concurrency=8) as client:
            await asyncio.gather(
                *(client.completions.create(prompt=f"x{i}", max_tokens=4) for i in range(60))
            )
            return client.report()

    report = asyncio.run(run())
    by_worker = {w.name: w.requests for w in report.workers}
    after = [w.metric("tokenmill_requests_total") for w in fleet]
    assert by_worker == {f"sim-{i}": after[i] - before[i] for i in range(2)}
    assert sum(by_worker.values()) == 60
    assert report.request_imbalance is not None and report.request_imbalance < 1.3
    assert report.errors_by_kind.get("connect", 0) >= 1
    dead_row = next(e for e in report.endpoints if e.name == dead)
    assert dead_row.requests <= 3  # only the first round (8 in flight over 3 endpoints) went there


def test_no_burst_pacing_holds_its_rate(fleet):
    async def run() -> float:
        async with AsyncClient(fleet[0].url, requests_per_minute=600, no_burst=True) as client:
            start = time.perf_counter()
            await asyncio.gather(*(client.completions.create(prompt="p", max_tokens=1) for _ in range(21)))
            return time.perf_counter() - start

    assert asyncio.run(run()) >= 1.9  # 10 per second: the 21st leaves 2 s after the first


def test_bad_client_options_name_the_field():
    with pytest.raises(ValueError, match="max_concurrency"):
        AsyncClient(max_concurrency=0)
    with pytest.raises(ValueError, match="requests_per_minute"):
        AsyncClient(requests_per_minute=-1)
    with pytest.raises(ValueError, match="base_url"):
        AsyncClient("localhost:8000")


@pytest.mark.parametrize(
    ("option", "value", "error", "allowed"),
    [
        ("timeout", 0, ValueError, "above 0"),
        ("timeout", -1, ValueError, "above 0"),
        ("timeout", math.nan, ValueError, "above 0"),
        ("timeout", "5", TypeError, "above 0"),
        ("max_retries", "3", TypeError, ">= 0"),
        ("max_retries", 1.5, TypeError, ">= 0"),
        ("max_retries", -1, ValueError, ">= 0"),
        ("requests_per_minute", "10", TypeError, "above 0"),
        ("tokens_per_minute", math.inf, ValueError, "above 0"),
        ("max_concurrency", 2.5, TypeError, "'auto' or an integer"),
        ("max_concurrency", "8", ValueError, "'auto' or an integer"),
        ("priority", "high", TypeError, "integer from"),
        ("priority", 2**31, ValueError, "integer from"),
        ("priority", True, TypeError, "integer from"),
        ("session_id", 5, TypeError, "one-line"),
        ("session_id", "a\r\nx-evil: 1", ValueError, "one-line"),
    ],
)
def test_client_arguments_are_checked_naming_the_argument_and_what_is_allowed(option, value, error, allowed):
    for make in (AsyncClient, Client):  # Client takes AsyncClient's arguments
        with pytest.raises(error, match=f"^{option}=.*allowed .*{allowed}"):
            make("http://127.0.0.1:9", **{option: value})


def test_create_checks_its_own_arguments_before_sending():
    async def run() -> None:
        async with AsyncClient("http://127.0.0.1:9", max_retries=0) as client:  # nothing listens: not sent
            with pytest.raises(TypeError, match=r"^messages='hi' is invalid: allowed a list of messages"):
                await client.chat.completions.create(messages="hi")
            with pytest.raises(TypeError, match=r"^messages\[1\]=5 is invalid"):
                await client.chat.completions.create(messages=[HI[0], 5])
            with pytest.raises(TypeError, match=r"^timeout='1' is invalid: allowed a number of seconds"):
                await client.completions.create(prompt="hi", timeout="1")
            with pytest.raises(ValueError, match=r"^timeout=0 is invalid"):
                await client.completions.create(prompt="hi", timeout=0)
            with pytest.raises(TypeError, match=r"^priority='high' is invalid"):
                await client.completions.create(prompt="hi", priority="high")
            assert client.dispatcher.gate.in_flight == 0 and not client.report().endpoints

    asyncio.run(run())
    with Client("http://127.0.0.1:9") as client, pytest.raises(TypeError, match=r"^messages="):
        client.chat.completions.create(messages="hi")


def test_grpc_transport_gives_the_same_answers_as_http(demo):
    async def run() -> None:
        async with AsyncClient(demo.url) as http, AsyncClient(demo.grpc_target, transport="grpc") as grpc_:
            for client in (http, grpc_):
                assert client.transport in ("http", "grpc")
            want = await http.chat.completions.create(messages=HI, max_tokens=10, temperature=0.0)
            got = await grpc_.chat.completions.create(messages=HI, max_tokens=10, temperature=0.0)
            assert got.choices[0].message.content == want.choices[0].message.content
            assert got.usage is not None and want.usage is not None
            assert got.usage.prompt_tokens == want.usage.prompt_tokens  # the same chat template
            assert got.worker == "demo-0"
            stream = await grpc_.chat.completions.create(
                messages=HI, max_tokens=10, temperature=0.0, stream=True
            )
            chunks = [c async for c in stream]
            assert "".join(c.text for c in chunks) == want.choices[0].message.content
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
            comp = await grpc_.completions.create(prompt="ROMEO:", max_tokens=6, temperature=0.0)
            assert (
                comp.text
                == (await http.completions.create(prompt="ROMEO:", max_tokens=6, temperature=0.0)).text
            )
            with pytest.raises(APIError) as info:
                await grpc_.completions.create(prompt="ROMEO:", max_tokens=6, logprobs=2)
            assert info.value.status == 400 and info.value.param == "logprobs"
            with pytest.raises(APIError) as info:
                await grpc_.completions.create(prompt="ROMEO:", max_tokens=-6)
            assert info.value.status == 400 and info.value.param == "max_tokens"

    asyncio.run(run())


def test_streamed_samples_come_one_choice_a_chunk_over_either_transport(demo):
    """As OpenAI and vLLM send them: the HTTP API and the SDK's gRPC wire alike."""

    async def run() -> None:
        async with AsyncClient(demo.url) as http, AsyncClient(demo.grpc_target, transport="grpc") as grpc_:
            for client in (http, grpc_):
                stream = await client.chat.completions.create(
                    messages=HI, max_tokens=5, n=2, temperature=1.0, seed=7, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                chunks = [c async for c in stream]
                assert all(len(c.choices) <= 1 for c in chunks)
                assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10

    asyncio.run(run())


def test_grpc_transport_ejects_an_address_nobody_answers(demo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def run():
        async with AsyncClient([demo.grpc_target, dead], transport="grpc", max_concurrency=2) as client:
            await asyncio.gather(
                *(client.completions.create(prompt=f"x{i}", max_tokens=2) for i in range(10))
            )
            return client.report()

    report = asyncio.run(run())
    assert report.errors_by_kind.get("connect", 0) >= 1
    assert {w.name: w.requests for w in report.workers} == {"demo-0": 10}
