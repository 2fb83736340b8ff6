"""The runner against the mock server: measured metrics equal the server's exact timings,
and failures of every kind are counted while the run goes on."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from tokenmill.bench.data import RequestSpec
from tokenmill.bench.load import LoadProfile
from tokenmill.bench.metrics import summarize
from tokenmill.bench.mock_server import MAX_TOKENS, MockConfig, MockServer
from tokenmill.bench.records import read_log, write_log
from tokenmill.bench.runner import LoadRunner, RunSettings
from tokenmill.client import HTTPTransport

SPECS = [RequestSpec(prompt=f"tell me story number {i}", prompt_tokens=5) for i in range(8)]


async def measure(config: MockConfig, profile: LoadProfile, specs=SPECS, **settings):
    async with MockServer(config) as server:
        runner = LoadRunner(RunSettings(server.url, profile, **settings))
        return await runner.run(specs), server


def test_every_metric_matches_the_server_timings():
    # TTFT 200 ms, tokens 20 ms apart, 128 tokens: TPOT 20 ms, E2E 0.2 + 127 * 0.02 = 2.74 s.
    records, server = asyncio.run(
        measure(MockConfig(ttft=0.2, itl=0.02), LoadProfile("concurrency", concurrency=8), max_tokens=128)
    )
    s = summarize(records)
    assert (s.succeeded, s.failed, s.token_mismatches) == (8, 0, 0)
    # Tolerances: the event loop's timer granularity plus a busy 2-core CI machine (TTFT also
    # carries the eight connections being opened at once: once measured 0.221 s).
    assert s.ttft.mean == pytest.approx(0.200, abs=0.04)
    assert s.tpot.mean == pytest.approx(0.020, abs=0.001)
    assert s.itl.median == pytest.approx(0.020, abs=0.003)
    assert s.e2e.mean == pytest.approx(2.74, abs=0.05)
    assert s.per_user_tok_s.mean == pytest.approx(50.0, rel=0.05)
    assert all(r.num_output_tokens == 128 and r.prompt_tokens == 5 for r in records)
    assert s.workers == {server.worker_id: {"requests": 8, "output_tokens": 1024}}


def test_completions_and_continuous_usage_count_tokens_per_message():
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.01, itl=0.001),
            LoadProfile("concurrency", concurrency=2),
            endpoint="completions",
            continuous_usage=True,
            max_tokens=16,
        )
    )
    assert all(r.ok and len(r.content) == 16 and r.counted_output_tokens == 16 for r in records)
    # Every SSE message is logged: 16 with a token each, then the usage chunk and [DONE] with none.
    assert all(len(r.messages) == 18 and [n for _, n in r.messages[-2:]] == [0, 0] for r in records)
    assert summarize(records).token_mismatches == 0


def test_open_loop_sends_on_schedule_and_latency_counts_from_it():
    records, _ = asyncio.run(
        measure(MockConfig(ttft=0.05, itl=0.005), LoadProfile("constant", rate=40.0), max_tokens=8)
    )
    intended = [r.intended for r in records]
    assert intended == pytest.approx([i / 40 for i in range(8)])
    s = summarize(records, max_lag_p99=0.05)
    assert s.offered_rate == pytest.approx(40.0)
    assert s.ttft.mean == pytest.approx(0.05, abs=0.02)
    assert s.e2e.mean == pytest.approx(0.085, abs=0.03)


def test_max_concurrency_caps_an_open_loop_as_queue_wait_not_client_lag():
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.1, itl=0.0),
            LoadProfile("constant", rate=1000.0, max_concurrency=2),
            max_tokens=1,
        )
    )
    s = summarize(records, max_lag_p99=0.05)
    assert s.succeeded == 8
    assert s.queue_wait.max > 0.25 and s.queued == 6  # the last pair waited for three before them
    assert s.ttft.max > 0.35  # the wait counts in latency: it runs from the intended send
    # The dispatcher itself was on time: the cap's wait is the server's backlog, not a client
    # falling behind, so the run stands and its achieved rate is the schedule's.
    assert s.schedule_lag.p99 < 0.05 and s.valid
    # The schedule's rate, not the cap's (2 at a time of 0.1 s: 20/s); a margin for a busy machine.
    assert s.achieved_rate > 5 * 20.0


def test_server_errors_and_cut_streams_are_counted_and_the_run_goes_on():
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.01, itl=0.002, fail_every=4, cut_every=3),
            LoadProfile("concurrency", concurrency=2),
            specs=SPECS * 2,
            max_tokens=10,
        )
    )
    s = summarize(records)
    assert s.requests == 16
    # Requests 4, 8, 12, 16 fail with 500; 3, 6, 9, 15 are cut (12 failed first).
    assert s.errors == {"http_5xx": 4, "protocol": 4}
    failed = next(r for r in records if r.error_kind == "http_5xx")
    assert failed.status == 500 and "injected failure" in failed.error
    cut = next(r for r in records if r.error_kind == "protocol")
    assert len(cut.content) == 5  # half of the 10 tokens, then the connection closed


def test_stopping_a_run_cancels_what_is_in_flight_and_keeps_the_records():
    async def main():
        async with MockServer(MockConfig(ttft=0.02, itl=0.05)) as server:
            runner = LoadRunner(
                RunSettings(server.url, LoadProfile("concurrency", concurrency=4), max_tokens=100)
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.5, stop.set)
            start = time.perf_counter()
            records = await runner.run(SPECS, stop=stop)
            return records, time.perf_counter() - start

    records, elapsed = asyncio.run(main())
    assert elapsed < 2.0
    assert len(records) == 4 and {r.error_kind for r in records} == {"cancelled"}
    assert all(len(r.messages) > 3 for r in records)  # what arrived before the stop is kept


def test_a_server_killed_mid_run_gives_a_report_with_the_errors_counted(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    timings = ["--ttft", "0.01", "--itl", "0.01"]
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "bench", "mock-server", "--port", "0", *timings]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        url = line.split("ready: ")[1].split("/v1")[0]

        async def main():
            runner = LoadRunner(RunSettings(url, LoadProfile("concurrency", concurrency=2), max_tokens=50))
            asyncio.get_running_loop().call_later(1.2, proc.send_signal, signal.SIGKILL)
            return await runner.run(SPECS * 3)

        records = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
    s = summarize(records)
    assert s.requests == 24 and s.succeeded >= 2 and s.failed >= 2
    assert set(s.errors) <= {"protocol", "connect"} and s.errors.get("connect", 0) >= 1
    log = tmp_path / "run.events.jsonl"
    write_log(log, {"url": url}, records)
    header, again = read_log(log)
    assert header["url"] == url and summarize(again).errors == s.errors


def test_the_event_log_round_trips(tmp_path):
    records, _ = asyncio.run(
        measure(MockConfig(ttft=0.0, itl=0.0), LoadProfile("poisson", rate=500.0), max_tokens=3)
    )
    path = tmp_path / "log.jsonl"
    write_log(path, {"profile": "poisson"}, records)
    header, back = read_log(path)
    assert header["profile"] == "poisson" and header["tokenmill_bench_log"] == 1
    assert [r.to_json() for r in back] == [r.to_json() for r in records]


def test_an_unreachable_server_fails_fast_with_a_connect_error():
    from tokenmill.client import ConnectError

    async def main():
        runner = LoadRunner(RunSettings("http://127.0.0.1:9", LoadProfile("concurrency", concurrency=1)))
        await runner.run(SPECS)

    start = time.perf_counter()
    with pytest.raises(ConnectError, match=r"127\.0\.0\.1:9"):
        asyncio.run(main())
    assert time.perf_counter() - start < 5


def test_multi_turn_sessions_carry_the_conversation_and_wait_for_each_reply():
    from tokenmill.bench.data import Length, multi_turn
    from tokenmill.bench.tokenizers import server_tokenizer
    from tokenmill.client import HTTPTransport

    async def main():
        async with MockServer(MockConfig(ttft=0.02, itl=0.002)) as server:
            async with HTTPTransport(server.url) as http:
                tok = await server_tokenizer(http, "mock")
                specs = await multi_turn(tok, 6, 3, Length(10, 10), Length(5, 5), seed=0)
            settings = RunSettings(server.url, LoadProfile("poisson", rate=50.0), think_time=0.05)
            return await LoadRunner(settings).run(specs)

    records = asyncio.run(main())
    assert len(records) == 6 and all(r.ok for r in records)
    for session in ("session-0", "session-1"):
        turns = sorted((r for r in records if r.user == session), key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2]
        # Turn k carries k earlier user messages and k replies of 5 words: 10 + 15k words.
        assert [r.prompt_tokens for r in turns] == [10, 25, 40]
        for before, after in itertools.pairwise(turns):
            assert after.sent >= before.end + 0.05 - 0.002  # the reply, then the think time
            assert after.intended == pytest.approx(before.end + 0.05)


def test_a_failed_turn_ends_its_session():
    async def main():
        async with MockServer(MockConfig(ttft=0.0, itl=0.0, fail_every=2)) as server:
            specs = [RequestSpec(prompt=f"t{i}", session="s", user="s") for i in range(4)]
            settings = RunSettings(server.url, LoadProfile("concurrency", concurrency=1))
            return await LoadRunner(settings).run(specs)

    records = asyncio.run(main())
    assert [(r.turn, r.error_kind) for r in records] == [(0, None), (1, "http_5xx")]


def test_a_server_that_does_not_stream_is_counted_as_such():
    async def plain(reader, writer):
        await reader.readuntil(b"\r\n\r\n")  # the body follows; answer without reading it all
        body = b'{"choices": [{"message": {"content": "hi"}}]}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        settings = RunSettings(url, LoadProfile("concurrency", concurrency=2), model="m")
        try:
            return await LoadRunner(settings).run(SPECS[:4])
        finally:
            server.close()

    records = asyncio.run(main())
    assert summarize(records).errors == {"not_streamed": 4}


def test_whole_responses_count_their_tokens_and_time_to_the_end():
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.05, itl=0.01),
            LoadProfile("concurrency", concurrency=4),
            max_tokens=11,
            stream=False,
        )
    )
    s = summarize(records)
    assert s.succeeded == 8 and s.token_mismatches == 0
    assert all(r.num_output_tokens == 11 and len(r.messages) == 1 for r in records)
    assert s.ttft.mean == pytest.approx(s.e2e.mean, abs=0.005)  # the first token comes with the last
    assert s.e2e.mean == pytest.approx(0.05 + 10 * 0.01, abs=0.03) and s.tpot is None


def sse_server(events: list[bytes]):
    """A stub that answers every request with these SSE events (chunked), then ends the body
    cleanly: whatever the events lack, the connection does not break."""

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head)
        for data in events:
            frame = b"data: " + data + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def run(specs, **settings):
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        profile = LoadProfile("concurrency", concurrency=1)
        try:
            return await LoadRunner(RunSettings(url, profile, model="m", **settings)).run(specs)
        finally:
            server.close()

    return run


ROLE = b'{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}'
USAGE = b'{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}'


def word(text: str) -> bytes:
    return b'{"choices": [{"index": 0, "delta": {"content": "%s"}}]}' % text.encode()


def test_a_stream_that_ends_before_done_is_a_cut_stream_not_a_success():
    # Two content chunks, then the body ends cleanly: no usage, no [DONE].
    records = asyncio.run(sse_server([word("one "), word("two ")])(SPECS[:3]))
    s = summarize(records)
    assert s.errors == {"stream_cut": 3} and s.succeeded == 0
    assert all(len(r.content) == 2 and "[DONE]" in r.error for r in records)


def test_the_log_keeps_every_sse_message_and_times_tokens_by_content():
    events = [ROLE, word("one "), word("two "), USAGE, b"[DONE]"]
    records = asyncio.run(sse_server(events)(SPECS[:2]))
    for r in records:
        assert r.ok and [n for _, n in r.messages] == [0, 1, 1, 0, 0]  # role, 2 tokens, usage, [DONE]
        times = [t for t, _ in r.messages]
        assert times == sorted(times) and r.first_token == times[1] and r.last_token == times[2]
        # TTFT counts to the first token; the role-only event before it stays in the log.
        assert summarize([r]).ttft.max == pytest.approx(times[1] - r.sent)
        assert r.output_tokens == 2 and r.counted_output_tokens == 2


def test_multi_turn_on_completions_sends_the_conversation_as_the_prompt():
    specs = [RequestSpec(prompt=f"turn {i} words", session="s", user="s") for i in range(3)]
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.0, itl=0.0),
            LoadProfile("concurrency", concurrency=1),
            specs=specs,
            endpoint="completions",
            max_tokens=4,
        )
    )
    # Turn k carries k earlier turns of 3 words and k replies of 4: 3 + 7k words, as on chat.
    assert [r.prompt_tokens for r in records] == [3, 10, 17]


@pytest.mark.parametrize("continuous", [False, True])
def test_tokens_streamed_without_text_count_from_the_usage_and_raise_no_warning(continuous):
    # Every 3rd of 16 tokens streams with empty text (a UTF-8 character cut in two): 5 of them.
    # The usage counts all 16; the content messages, which time TTFT and ITL, stay the 11 with text.
    records, _ = asyncio.run(
        measure(
            MockConfig(ttft=0.0, itl=0.001, empty_every=3),
            LoadProfile("concurrency", concurrency=2),
            specs=SPECS[:4],
            continuous_usage=continuous,
            max_tokens=16,
        )
    )
    assert all(r.ok and r.output_tokens == 16 and r.counted_output_tokens == 16 for r in records)
    assert all(len(r.content) == 11 and sum(n for _, n in r.content) == 11 for r in records)
    assert summarize(records).token_mismatches == 0


def test_a_stream_with_more_content_messages_than_its_usage_is_a_mismatch():
    three_words = [ROLE, word("one "), word("two "), word("three "), USAGE, b"[DONE]"]
    records = asyncio.run(sse_server(three_words)(SPECS[:1]))  # usage says 2 tokens
    assert records[0].counted_output_tokens == 3 and summarize(records).token_mismatches == 1


@pytest.mark.parametrize("max_tokens", [10**12, MAX_TOKENS + 1, 0, True, "8"])
def test_the_mock_server_refuses_a_length_it_cannot_make_naming_max_tokens(max_tokens):
    async def main():
        async with MockServer(MockConfig(ttft=0, itl=0)) as server, HTTPTransport(server.url) as http:
            chat = [{"role": "user", "content": "hi"}]
            body = {"model": "mock", "messages": chat, "max_tokens": max_tokens}
            refused = await http.request("POST", "/v1/chat/completions", json=body)
            body["max_tokens"] = 3  # and the server goes on answering
            answered = await http.request("POST", "/v1/chat/completions", json=body)
            return refused, answered

    refused, answered = asyncio.run(asyncio.wait_for(main(), 10))
    assert refused.status == 400
    error = refused.json()["error"]
    assert error["param"] == "max_tokens" and f"from 1 to {MAX_TOKENS}" in error["message"]
    assert answered.status == 200 and answered.json()["usage"]["completion_tokens"] == 3


def test_the_mock_server_refuses_a_default_length_it_cannot_make():
    with pytest.raises(ValueError, match=f"output_tokens must be from 0 to {MAX_TOKENS}"):
        MockConfig(output_tokens=MAX_TOKENS + 1)
