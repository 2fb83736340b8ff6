"""The worker's HTTP behaviour beyond the OpenAI calls: keys, overload, headers, disconnects, drain."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import start_server

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Speak, Romeo."}]}


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_every_response_names_the_worker(server):
    with server.client() as http:
        for resp in (
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
            http.post("/v1/completions", json={"prompt": "Hi", "temperature": "hot"}),
            http.get("/metrics"),
            http.get("/no/such/route"),
            http.get("/health"),
        ):
            assert resp.headers["x-tokenmill-worker"] == server.url.removeprefix("http://"), resp.url
        assert http.get("/no/such/route").json()["error"]["type"] == "not_found_error"


def test_health_ready_version_tokenize(server):
    with server.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready").json()
        assert ready["status"] == "ready" and ready["max_num_seqs"] == 256
        assert http.get("/version").json()["version"]
        toks = http.post(
            "/tokenize", json={"prompt": "Good night, good night", "add_special_tokens": False}
        ).json()
        assert toks["count"] == len(toks["tokens"]) > 0 and toks["max_model_len"] == 1024
        text = http.post("/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
        assert text == "Good night, good night"
        chat = http.post("/tokenize", json={"messages": CHAT["messages"]}).json()
        assert chat["count"] > toks["count"] / 2
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert http.get("/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_a_body_not_sent_as_json_is_a_400_naming_the_content_type(server):
    body = b'{"model": "demo", "prompt": "Hi"}'
    with server.client() as http:
        form = http.post("/v1/completions", content=body, headers={"content-type": "text/plain"})
        json_type = {"content-type": "application/json"}
        plain = http.post("/v1/completions", content=b"{not json", headers=json_type)
        untyped = http.post("/v1/completions", content=body)  # requests.post(url, data=...) sends no type
    assert form.status_code == 400 and "content-type: application/json" in form.json()["error"]["message"]
    assert "'text/plain'" in form.json()["error"]["message"]
    assert untyped.status_code == 400 and "came without a content-type" in untyped.json()["error"]["message"]
    assert plain.status_code == 400 and "not a valid JSON object" in plain.json()["error"]["message"]


def test_priority_header_must_be_an_integer(server):
    with server.client() as http:
        resp = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"x-tokenmill-priority": "high"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "x-tokenmill-priority"
        huge = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"x-tokenmill-priority": "9" * 23})
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "x-tokenmill-priority"
        body = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "priority": 2**80})
        assert body.status_code == 400 and body.json()["error"]["param"] == "priority", body.text


def _kv_blocks_free(server) -> bool:
    return (
        server.metric("tokenmill_kv_cache_usage_ratio") == 0
        and server.metric("tokenmill_requests_running") == 0
        and server.metric("tokenmill_requests_in_flight") == 0
    )


def test_client_that_leaves_mid_stream_frees_its_blocks(server):
    aborted_before = server.metric("tokenmill_requests_total") - server.metric(
        'tokenmill_requests_total{finished_reason="length",model_name="demo"}'
    )
    body = {**CHAT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = sse_events(resp)
        for _ in range(3):
            assert json.loads(next(events))["choices"][0]["delta"]["content"] is not None
        assert server.metric("tokenmill_kv_cache_usage_ratio") > 0  # it holds blocks while streaming
    # leaving the with-block closed the connection mid-stream
    server.wait_for(lambda: _kv_blocks_free(server), what="the abandoned request's blocks to be freed")
    aborted = server.metric('tokenmill_requests_total{finished_reason="abort",model_name="demo"}')
    assert aborted >= 1 and server.metric("tokenmill_requests_total") > aborted_before


def test_client_that_leaves_before_a_whole_response_frees_its_blocks(server):
    body = {**CHAT, "max_tokens": 1000, "ignore_eos": True}
    with server.client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body)
    server.wait_for(lambda: _kv_blocks_free(server), what="the abandoned request's blocks to be freed")


def test_metrics_cover_latency_load_and_saturation(server):
    with server.client() as http:
        http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "ignore_eos": True})
    m = server.metrics()
    names = {k.split("{")[0] for k in m}
    for name in (
        "tokenmill_requests_running",
        "tokenmill_requests_waiting",
        "tokenmill_kv_cache_usage_ratio",
        "tokenmill_prefix_cache_hits_total",
        "tokenmill_prefix_cache_queries_total",
        "tokenmill_preemptions_total",
        "tokenmill_prompt_tokens_total",
        "tokenmill_generation_tokens_total",
        "tokenmill_time_to_first_token_seconds_count",
        "tokenmill_inter_token_latency_seconds_count",
        "tokenmill_e2e_request_latency_seconds_count",
        "tokenmill_request_queue_time_seconds_count",
        "tokenmill_requests_total",
        "tokenmill_requests_by_priority_total",
        "tokenmill_engine_busy_ratio",
        "tokenmill_step_tokens_bucket",
        "tokenmill_step_budget_utilization_ratio_bucket",
        "tokenmill_concurrency_utilization_ratio",
        # --vllm-metrics: the same figures under vLLM's names
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_success_total",
    ):
        assert name in names, name
    assert (
        m['tokenmill_generation_tokens_total{model_name="demo"}']
        == m['vllm:generation_tokens_total{model_name="demo"}']
    )
    assert m['tokenmill_generation_tokens_total{model_name="demo"}'] >= 8
    assert 0 < m['tokenmill_engine_busy_ratio{model_name="demo"}'] <= 1
    assert m['tokenmill_time_to_first_token_seconds_count{model_name="demo"}'] >= 1


def test_kv_events_announce_the_scheme_then_stream_stored_blocks(server):
    prompt = "To be, or not to be, that is the question: " * 8  # several full blocks
    with server.client() as http, http.stream("GET", "/v1/kv_events") as resp:
        events = sse_events(resp)
        hello = json.loads(next(events))
        assert hello["type"] == "config" and hello["block_size"] == 16
        assert hello["hash_scheme"] == "sha256-64-chained"
        snapshot = json.loads(next(events))["events"]
        assert [e["type"] for e in snapshot] == ["CachedBlocks"]  # what is cached already, to start from
        threading.Thread(
            target=lambda: httpx.post(
                f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}
            )
        ).start()
        stored = None
        while stored is None:
            batch = json.loads(next(events))
            stored = next((e for e in batch["events"] if e["type"] == "BlockStored"), None)
    assert stored["block_size"] == 16 and len(stored["block_hashes"]) >= 4


# -- workers of their own ------------------------------------------------------------------------


def test_api_key_is_required_when_set():
    s = start_server("--api-key", "sesame", "--grpc-port", "-1")
    try:
        wrong = openai.OpenAI(base_url=f"{s.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model="demo", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        right = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model="demo", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        # A body that does not parse, or does not validate, is still a 401 without the key.
        for body in (b"{not json", b'{"prompt": 5}'):
            resp = httpx.post(
                f"{s.url}/v1/completions", content=body, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 401, resp.text
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{s.url}/metrics").status_code == 200
    finally:
        s.stop()


def test_full_waiting_queue_is_a_429_with_retry_after():
    s = start_server("--max-num-seqs", "1", "--max-waiting-requests", "1", "--grpc-port", "-1")
    try:
        long = {**CHAT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with s.client() as http, http.stream("POST", "/v1/chat/completions", json=long) as running:
            events = sse_events(running)  # kept: dropping the iterator would close the stream
            next(events)  # one runs; of four more at once, one may wait and the rest are refused
            results: list[httpx.Response] = []
            threads = [
                threading.Thread(
                    target=lambda: results.append(
                        httpx.post(f"{s.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=60)
                    )
                )
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        refused = [r for r in results if r.status_code == 429]
        assert len(results) == 4 and len(refused) >= 2, [r.status_code for r in results]
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "engine_overloaded"
            assert r.headers["x-tokenmill-worker"]
    finally:
        s.stop()


def test_sigterm_drains_running_requests_then_exits():
    s = start_server("--grpc-port", "-1", "--drain-timeout", "30")
    # Long enough (~2 s) to still be running when the probes below arrive.
    body = {**CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    finish: list[str] = []
    with s.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = sse_events(resp)
        next(events)
        s.proc.send_signal(15)
        time.sleep(0.3)
        during = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        ready = http.get("/ready")
        for data in events:
            if data != "[DONE]":
                finish += [c["finish_reason"] for c in json.loads(data)["choices"] if c["finish_reason"]]
    assert during.status_code == 503 and ready.status_code == 503
    assert finish == ["length"]  # the running request got all its tokens
    assert s.proc.wait(20) == 0


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain-timeout", "second-signal"])
def test_requests_left_at_the_end_of_a_drain_are_aborted_and_answered_whole(second_signal):
    """Past --drain-timeout, or at a second SIGTERM, running requests end with finish reason
    abort: a stream with that chunk and [DONE], a whole answer as a 200, and the worker exits."""
    s = start_server("--grpc-port", "-1", "--drain-timeout", "60" if second_signal else "0.5")
    body = {**CHAT, "max_tokens": 1000, "ignore_eos": True}
    whole: list[httpx.Response] = []
    finish: list[str | None] = []
    done: list[str] = []
    with s.client(timeout=60) as http:
        t = threading.Thread(target=lambda: whole.append(http.post("/v1/chat/completions", json=body)))
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = sse_events(resp)
            next(events)
            t.start()
            time.sleep(0.3)
            s.proc.send_signal(15)
            if second_signal:
                time.sleep(0.5)
                s.proc.send_signal(15)
            signalled = time.monotonic()
            for data in events:
                if data == "[DONE]":
                    done.append(data)
                else:
                    finish += [c["finish_reason"] for c in json.loads(data)["choices"] if c["finish_reason"]]
        t.join(30)
    assert finish == ["abort"] and done == ["[DONE]"]
    assert whole[0].status_code == 200, whole[0].text
    assert whole[0].json()["choices"][0]["finish_reason"] == "abort"
    assert s.proc.wait(20) == 0
    assert time.monotonic() - signalled < 5, "the worker lingered after its drain ended"
    assert not [line for line in s.log if "Traceback" in line or "Exception in ASGI" in line], s.log


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/v1/completions", {"prompt": "Hi", "stop": 5}, "stop", "valid string; or"),
        ("/v1/completions", {"prompt": [1.5]}, "prompt", "valid string; or"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "or"),
        ("/tokenize", {}, "prompt", "one of prompt or messages is required"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0]", "needs content"),
        ("/v1/completions", {"prompt": "hi \ud800"}, "prompt", "unpaired surrogates"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "surr"),
    ],
)
def test_errors_name_the_field_as_the_user_wrote_it(server, path, body, param, says):
    """Not pydantic's union member ("stop.str") or model class, nor a tokenizer's TypeError."""
    with server.client() as http:
        # json.dumps writes a lone surrogate as the escape clients send; httpx's json= would refuse it
        resp = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == param, error
    assert says in error["message"] and "Request" not in error["message"], error


def test_an_unknown_field_is_ignored_and_its_name_logged_once(server):
    with server.client() as http:
        for _ in range(2):
            resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "max_tokn": 9})
            assert resp.status_code == 200
    server.wait_for(lambda: any("'max_tokn'" in line for line in server.log), what="the warning")
    assert sum("'max_tokn'" in line for line in server.log) == 1
