"""The gRPC front (tokenmill.v1.Generation) over a real AsyncEngine, seen on the wire with the raw stub.

The SDK's view of the same calls is in tests/client/test_grpc_client.py; here each
test checks what a client in any language would see: messages, status codes,
initial and trailing metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
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
from tokenmill.engine import CompletionOutput, OutputKind, RequestMetrics, RequestOutput, SamplingParams
from tokenmill.protocol import generation_pb2 as pb
from tokenmill.protocol import generation_pb2_grpc as pb_grpc
from tokenmill.server.grpc_service import GenerationService, _response

PROMPT = "ROMEO:"
LONG = 200  # tokens: at least a second under PACE, so the request is still running when poked
PACE = 0.005  # seconds slept per engine step


@pytest.fixture(scope="module")
def served():
    """One engine behind three workers: open, keyed, draining; and a worker whose queue is always full."""
    engine = demo_engine()
    full_engine = demo_engine(max_waiting_requests=0)
    recorder = Recorder()
    engine.add_listener(recorder)
    engine.add_listener(Pacer(PACE))
    thread = ServerThread()
    try:
        worker = make_worker(engine)
        addresses = {
            "open": thread.serve(worker),
            "keyed": thread.serve(make_worker(engine, "keyed-worker", api_key="secret")),
            "draining": thread.serve(make_worker(engine, "draining-worker", draining=True)),
            "full": thread.serve(make_worker(full_engine, "full-worker")),
        }
        channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
        stubs = {name: pb_grpc.GenerationStub(channel) for name, channel in channels.items()}
        fields = {"engine": engine, "worker": worker, "recorder": recorder, "stubs": stubs, "thread": thread}
        yield type("Served", (), fields)
        for channel in channels.values():
            channel.close()
    finally:
        thread.close()
        engine.shutdown()
        full_engine.shutdown()


@pytest.fixture
def stub(served) -> pb_grpc.GenerationStub:
    return served.stubs["open"]


def generate(stub, timeout: float = 10.0, metadata=(), **fields) -> list[pb.GenerateResponse]:
    fields.setdefault("text", PROMPT)
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=timeout, metadata=metadata))


def joined(responses: list[pb.GenerateResponse], index: int = 0) -> tuple[str, list[int]]:
    choices = [c for r in responses for c in r.choices if c.index == index]
    return "".join(c.text for c in choices), [t for c in choices for t in c.token_ids]


def engine_output(engine, prompt, params: SamplingParams) -> RequestOutput:
    """The same request straight through AsyncEngine.generate, cumulative: the oracle."""

    async def go() -> RequestOutput:
        outs = [
            out async for out in engine.generate(prompt, replace(params, output_kind=OutputKind.CUMULATIVE))
        ]
        return outs[-1]

    return asyncio.run(asyncio.wait_for(go(), 10))


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata())


def test_greedy_stream_matches_the_engine_with_token_ids_and_usage(served, stub):
    responses = generate(stub, temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = engine_output(served.engine, PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))
    text, token_ids = joined(responses)
    assert len(token_ids) == 24
    assert text and text == expected.outputs[0].text
    assert token_ids == expected.outputs[0].token_ids
    assert len(responses) > 1, "one message per step, not one at the end"
    assert all(not r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids) > 0
    assert last.usage.completion_tokens == 24
    assert {r.request_id for r in responses} == {last.request_id} and last.request_id


def test_token_id_prompt_gives_the_same_tokens_as_its_text(served, stub):
    prompt_ids = served.engine.engine.tokenizer.encode(PROMPT)
    by_ids = generate(stub, text=None, token_ids=pb.TokenIds(ids=prompt_ids), temperature=0.0, max_tokens=8)
    by_text = generate(stub, temperature=0.0, max_tokens=8)
    assert joined(by_ids)[1] == joined(by_text)[1]
    assert len(joined(by_ids)[1]) > 0


def test_chat_prompt_is_rendered_with_the_workers_template(served, stub):
    messages = [{"role": "user", "content": "Name a river."}]
    chat = pb.Chat(messages=[pb.ChatMessage(**m) for m in messages])
    by_chat = generate(stub, text=None, chat=chat, temperature=0.0, max_tokens=8)
    rendered = served.engine.engine.tokenizer.encode_chat(messages)
    by_ids = generate(stub, text=None, token_ids=pb.TokenIds(ids=rendered), temperature=0.0, max_tokens=8)
    assert joined(by_chat)[1] == joined(by_ids)[1] and joined(by_chat)[1]
    assert by_chat[-1].usage.prompt_tokens == len(rendered)
    error = rpc_error(lambda: generate(stub, text=None, chat=pb.Chat()))
    assert trailing(error)["x-tokenmill-error-param"] == "chat.messages"
    wizard = pb.Chat(messages=[pb.ChatMessage(role="wizard", content="Hi")])
    error = rpc_error(lambda: generate(stub, text=None, chat=wizard))
    assert trailing(error)["x-tokenmill-error-param"] == "chat.messages[0].role"  # as HTTP refuses it
    long = pb.Chat(messages=[pb.ChatMessage(role="user", content="river " * 400)])
    error = rpc_error(lambda: generate(stub, text=None, chat=long))
    assert trailing(error)["x-tokenmill-error-param"] == "chat.messages"
    assert trailing(error)["x-tokenmill-error-code"] == "context_length_exceeded"


def test_logprobs_match_the_engine(served, stub):
    responses = generate(stub, temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    expected = engine_output(served.engine, PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))
    got = [lp for r in responses for c in r.choices for lp in c.logprobs]
    want = expected.outputs[0].logprobs
    assert len(got) == len(want) == 6
    for g, w in zip(got, want, strict=True):
        assert (g.token_id, g.rank) == (w.token_id, w.rank) == (g.token_id, 1)  # greedy: the top token
        assert g.logprob == pytest.approx(w.logprob)
        assert {t.token_id: t.logprob for t in g.top} == pytest.approx(w.top)
        assert len(g.top) == 3


def test_two_samples_stream_separately_and_each_finishes_once(served, stub):
    fields = dict(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    responses = generate(stub, **fields)
    # Fields left out take the model's defaults (the demo model's top_p is 0.95), as the engine's do.
    params = replace(served.engine.engine.default_sampling_params(), **fields)
    expected = engine_output(served.engine, PROMPT, params)
    for index in (0, 1):
        text, token_ids = joined(responses, index)
        assert (text, token_ids) == (expected.outputs[index].text, expected.outputs[index].token_ids)
        finishes = [
            c.finish_reason for r in responses for c in r.choices if c.index == index and c.finish_reason
        ]
        assert finishes == ["length"]
    assert joined(responses, 0)[1] != joined(responses, 1)[1], "two samples, not one sent twice"
    assert responses[-1].usage.completion_tokens == 20


def test_response_skips_empty_deltas_and_reports_a_finish_once():
    def output(finished: bool, *choices: CompletionOutput) -> RequestOutput:
        return RequestOutput(
            "r", None, [1, 2], list(choices), finished, RequestMetrics(0.0, num_prompt_tokens=2)
        )

    reported: set[int] = set()
    first = _response(
        output(False, CompletionOutput(0, "a", [7], "length"), CompletionOutput(1, "b", [8])), reported
    )
    assert [(c.index, c.finish_reason) for c in first.choices] == [(0, "length"), (1, "")]
    # Sample 0 is done: later steps list it with an empty delta, which must not be sent again.
    idle = output(False, CompletionOutput(0, "", [], "length"), CompletionOutput(1, "", []))
    assert _response(idle, reported) is None
    last = _response(
        output(True, CompletionOutput(0, "", [], "length"), CompletionOutput(1, "c", [9], "stop", 9)),
        reported,
    )
    assert [(c.index, c.text, c.finish_reason, c.stop_token_id) for c in last.choices] == [
        (1, "c", "stop", 9)
    ]
    assert last.usage.prompt_tokens == 2
    assert not first.HasField("usage")


def test_stop_string_ends_the_text_before_it(served, stub):
    full = joined(generate(stub, temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    stop = next(w for w in full.split()[2:] if len(w) > 2)
    responses = generate(stub, temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    assert joined(responses)[0] == full[: full.index(stop)]
    last = responses[-1].choices[-1]
    assert (last.finish_reason, last.stop_str) == ("stop", stop)
    kept = generate(
        stub, temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert joined(kept)[0] == full[: full.index(stop) + len(stop)]


def test_invalid_parameter_is_invalid_argument_naming_the_field(stub):
    error = rpc_error(lambda: generate(stub, temperature=-1.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in error.details() and ">= 0" in error.details()
    assert trailing(error)["x-tokenmill-error-param"] == "temperature"
    assert trailing(error)["x-tokenmill-error-type"] == "invalid_request_error"
    assert dict(error.initial_metadata())["x-tokenmill-worker"] == "test-worker"
    error = rpc_error(lambda: generate(stub, top_k=-5))
    assert trailing(error)["x-tokenmill-error-param"] == "top_k"
    error = rpc_error(lambda: generate(stub, text=None, token_ids=pb.TokenIds(ids=[10**6])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "4096" in error.details()
    error = rpc_error(lambda: generate(stub, text=None))
    assert (error.code(), trailing(error)["x-tokenmill-error-param"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    )


def test_prompt_over_max_model_len_names_both_lengths(stub):
    error = rpc_error(lambda: generate(stub, text=None, token_ids=pb.TokenIds(ids=[5] * 300)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "300" in error.details() and str(MAX_MODEL_LEN) in error.details()
    assert trailing(error)["x-tokenmill-error-param"] == "prompt"
    assert trailing(error)["x-tokenmill-error-code"] == "context_length_exceeded"


def test_max_tokens_past_the_context_is_refused_and_none_means_up_to_it(stub):
    ids = pb.TokenIds(ids=[5] * 250)
    error = rpc_error(lambda: generate(stub, text=None, token_ids=ids, max_tokens=7))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error.details()
    assert trailing(error)["x-tokenmill-error-param"] == "max_tokens"
    tokens = joined(generate(stub, text=None, token_ids=ids, ignore_eos=True))[1]
    assert len(tokens) == MAX_MODEL_LEN - 250


def test_unknown_model_is_not_found_and_the_served_one_works(stub):
    error = rpc_error(lambda: generate(stub, model="gpt-17"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-17" in error.details() and "demo" in error.details()
    assert len(joined(generate(stub, model="demo", max_tokens=2, ignore_eos=True))[1]) == 2


def test_api_key_is_required_when_the_worker_has_one(served):
    keyed = served.stubs["keyed"]
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "secret"),)]:
        error = rpc_error(lambda md=metadata: generate(keyed, metadata=md, max_tokens=2))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = rpc_error(lambda md=metadata: keyed.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", "Bearer secret"),)
    assert len(joined(generate(keyed, metadata=good, max_tokens=2, ignore_eos=True))[1]) == 2
    assert keyed.ModelInfo(pb.ModelInfoRequest(), metadata=good, timeout=5).worker_id == "keyed-worker"
    # Health stays open, as HTTP /health does, for load balancers.
    assert keyed.Health(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.SERVING


def test_abort_from_another_call_ends_the_stream_and_frees_blocks(served, stub):
    request = pb.GenerateRequest(text=PROMPT, request_id="to-abort", max_tokens=LONG, ignore_eos=True)
    call = stub.Generate(request, timeout=10)
    # The id comes back as soon as the engine holds the request: an Abort sent now finds it.
    assert dict(call.initial_metadata())["x-request-id"] == "to-abort"
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).aborted
    responses = list(call)
    assert {r.request_id for r in responses} == {"to-abort"}
    assert responses[-1].choices[0].finish_reason == "abort"
    assert responses[-1].usage.completion_tokens < LONG
    assert served.recorder.wait("to-abort").outputs[0].finish_reason == "abort"
    wait_blocks_free(served.engine)
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).aborted
    assert not stub.Abort(pb.AbortRequest(request_id="never-was"), timeout=5).aborted


def test_abort_reaches_grpc_calls_only_not_the_http_fronts_requests(served, stub):
    """HTTP and gRPC requests share the engine's ids; an id seen in an HTTP stream must not let a
    gRPC client cut that request."""
    tasks = []

    async def as_http_would() -> None:
        params = SamplingParams(max_tokens=LONG, ignore_eos=True, output_kind=OutputKind.DELTA)
        stream = served.worker.engine.open(PROMPT, params, "cmpl-over-http")

        async def read() -> None:
            async for _ in stream:
                pass

        tasks.append(asyncio.ensure_future(read()))

    served.thread.run(as_http_would)
    assert not stub.Abort(pb.AbortRequest(request_id="cmpl-over-http"), timeout=5).aborted
    assert served.recorder.wait("cmpl-over-http", timeout=30).outputs[0].finish_reason == "length"


def test_deadline_aborts_the_request_and_frees_blocks(served, stub):
    fields = dict(request_id="past-deadline", max_tokens=LONG, ignore_eos=True)
    error = rpc_error(lambda: generate(stub, timeout=0.4, **fields))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    out = served.recorder.wait("past-deadline")
    assert out.outputs[0].finish_reason == "abort"
    assert 0 < out.metrics.num_output_tokens < LONG
    wait_blocks_free(served.engine)


def test_client_cancel_aborts_the_request(served, stub):
    call = stub.Generate(
        pb.GenerateRequest(text=PROMPT, request_id="cancelled", max_tokens=LONG, ignore_eos=True)
    )
    next(call)
    call.cancel()
    assert served.recorder.wait("cancelled").outputs[0].finish_reason == "abort"
    wait_blocks_free(served.engine)


def test_priority_metadata_reaches_the_engine_and_the_body_wins(served, stub):
    generate(stub, request_id="prio-md", max_tokens=1, metadata=(("x-tokenmill-priority", "7"),))
    generate(
        stub, request_id="prio-body", max_tokens=1, priority=-3, metadata=(("x-tokenmill-priority", "7"),)
    )
    generate(stub, request_id="prio-none", max_tokens=1)
    assert served.recorder.wait("prio-md").metrics.priority == 7
    assert served.recorder.wait("prio-body").metrics.priority == -3
    assert served.recorder.wait("prio-none").metrics.priority == 0
    error = rpc_error(lambda: generate(stub, metadata=(("x-tokenmill-priority", "high"),)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(error)["x-tokenmill-error-param"] == "x-tokenmill-priority"


def test_tenant_metadata_is_accepted_and_logged(stub, caplog):
    with caplog.at_level("DEBUG", logger="tokenmill.server.grpc_service"):
        generate(stub, request_id="tenant-req", max_tokens=1, metadata=(("x-tokenmill-tenant", "team-a"),))
    assert any("tenant-req" in r.getMessage() and "tenant=team-a" in r.getMessage() for r in caplog.records)


def test_every_rpc_sends_the_worker_id(stub):
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=1))
    list(call)
    assert dict(call.initial_metadata())["x-tokenmill-worker"] == "test-worker"
    assert dict(call.initial_metadata())["x-request-id"].startswith("grpc-")
    for method, request in [
        (stub.Health, pb.HealthRequest()),
        (stub.ModelInfo, pb.ModelInfoRequest()),
        (stub.Abort, pb.AbortRequest(request_id="x")),
    ]:
        _, call = method.with_call(request, timeout=5)
        assert dict(call.initial_metadata())["x-tokenmill-worker"] == "test-worker"


def test_health_and_model_info(served, stub):
    health = stub.Health(pb.HealthRequest(), timeout=5)
    assert health.status == pb.HealthResponse.SERVING
    assert health.worker_id == "test-worker"
    assert 0.0 <= health.kv_cache_usage <= 1.0
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    engine = served.engine.engine
    assert (info.model, info.max_model_len, info.vocab_size) == (
        "demo",
        MAX_MODEL_LEN,
        engine.model_config.vocab_size,
    )
    assert (info.architecture, info.block_size, info.max_num_seqs) == ("LlamaForCausalLM", 16, 256)
    assert info.worker_id == "test-worker"


def test_draining_worker_refuses_new_requests_and_is_not_serving(served):
    draining = served.stubs["draining"]
    error = rpc_error(lambda: generate(draining, max_tokens=2))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailing(error)["retry-after"] == "1"
    assert draining.Health(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.NOT_SERVING


def test_full_queue_is_resource_exhausted_with_retry_after(served):
    error = rpc_error(lambda: generate(served.stubs["full"], max_tokens=2))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(trailing(error)["retry-after"]) >= 1
    assert "max_waiting_requests" in error.details()


def test_every_rpc_of_the_proto_is_served():
    """The generated base class answers UNIMPLEMENTED; the service must override every RPC it declares."""
    rpcs = [m.name for m in pb.DESCRIPTOR.services_by_name["Generation"].methods]
    assert rpcs
    for name in rpcs:
        assert getattr(GenerationService, name) is not getattr(pb_grpc.GenerationServicer, name), name
