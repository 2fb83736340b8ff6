"""Long prompts are tokenized on a thread, off the worker's event loop, by the tokenizer's call that
lets go of the GIL; the model gets the same tokens, over HTTP and gRPC alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

import tokenmill.server.prompt_tokens as prompt_tokens
from tests.grpc_worker import ServerThread, demo_engine, make_worker
from tests.server.in_thread import serving_in_thread
from tokenmill.engine import TokenizedPrompt
from tokenmill.engine.loader import DEMO_MODEL_DIR
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.protocol import generation_pb2 as pb
from tokenmill.protocol import generation_pb2_grpc as pb_grpc
from tokenmill.server.app import build_app

TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east. " * 3  # ~220 chars


def test_the_tokenizer_lets_go_of_the_gil_for_a_long_text_and_gives_the_same_tokens():
    """tokenizers' single-text call holds the GIL (a thread beside it could not run a line for
    the whole of a long text); the batch call, used from a few thousand characters on, does not."""
    tokenizer = Tokenizer(DEMO_MODEL_DIR)  # (no max_model_len: no length check)
    long_text = TEXT * 2000  # ~440,000 characters: about a second of tokenizing here
    for special in (True, False):
        single = tokenizer.backend.encode(TEXT * 30, add_special_tokens=special).ids  # the single-text call
        assert tokenizer.encode(TEXT * 30, special) == single
    ticks = 0
    worker = threading.Thread(target=tokenizer.encode, args=(long_text,))
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    assert ticks >= 20, f"this thread ran {ticks} times while the text was tokenized"


class Recorder:
    """Wraps a tokenizer's ``encode``: the thread of each call, by the text's length."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.encode = tokenizer.encode
        self.threads: dict[int, set[int]] = {}

    def __call__(self, text: str, *args, **kwargs) -> list[int]:
        self.threads.setdefault(len(text), set()).add(threading.get_ident())
        return self.encode(text, *args, **kwargs)

    def threads_for(self, at_least: int) -> set[int]:
        return {t for n, threads in self.threads.items() if n >= at_least for t in threads}


@pytest.fixture(scope="module")
def engine() -> Iterator:
    engine = demo_engine()
    yield engine
    engine.shutdown()


@pytest.fixture
def recorder(engine, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The threshold lowered so the test's prompts count as long, and the engine's encode watched."""
    tokenizer = engine.engine.tokenizer
    recorder = Recorder(tokenizer)
    monkeypatch.setattr(tokenizer, "encode", recorder)
    monkeypatch.setattr(prompt_tokens, "OFF_LOOP_CHARS", 100)
    return recorder


def test_http_tokenizes_a_long_prompt_on_a_thread_and_serves_it_the_same(engine, recorder, monkeypatch):
    app = build_app(make_worker(engine))
    greedy = {"model": "demo", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = {**greedy, "messages": [{"role": "user", "content": TEXT}]}
    completion = {**greedy, "prompt": TEXT, "echo": True}
    with serving_in_thread(app) as (url, loop_thread), httpx.Client(base_url=url, timeout=30) as http:
        answers = [
            http.post("/v1/completions", json=completion).json(),
            http.post("/v1/chat/completions", json=chat).json(),
            http.post("/tokenize", json={"model": "demo", "prompt": TEXT}).json(),
            http.post("/v1/completions", json={**completion, "prompt": "ROMEO:"}).json(),  # short
        ]
        off_loop = recorder.threads_for(100)
        assert off_loop and loop_thread.ident not in off_loop, "a long prompt was tokenized on the loop"
        assert recorder.threads[len("ROMEO:")] == {loop_thread.ident}  # a short one at once
        monkeypatch.setattr(prompt_tokens, "OFF_LOOP_CHARS", 10**9)  # everything on the loop, as before
        on_loop = [
            http.post("/v1/completions", json=completion).json(),
            http.post("/v1/chat/completions", json=chat).json(),
            http.post("/tokenize", json={"model": "demo", "prompt": TEXT}).json(),
        ]
    assert answers[0]["choices"][0]["text"].startswith(TEXT)  # echo: the prompt's own text
    for got, expected in zip(answers, on_loop, strict=False):
        assert got.get("tokens") == expected.get("tokens")
        for count in ("prompt_tokens", "completion_tokens"):  # (the second run's prompt is cached)
            assert got.get("usage", {}).get(count) == expected.get("usage", {}).get(count)
        assert got.get("choices", [{}])[0].get("text") == expected.get("choices", [{}])[0].get("text")
        assert got.get("choices", [{}])[0].get("message") == expected.get("choices", [{}])[0].get("message")


def test_grpc_tokenizes_a_long_prompt_on_a_thread(engine, recorder):
    thread = ServerThread()
    try:
        address = thread.serve(make_worker(engine))
        loop_thread = thread.run(_thread_id)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for prompt in (
                {"text": TEXT},
                {"chat": pb.Chat(messages=[pb.ChatMessage(role="user", content=TEXT)])},
            ):
                request = pb.GenerateRequest(**prompt, max_tokens=3, temperature=0.0, ignore_eos=True)
                responses = list(stub.Generate(request, timeout=30))
                assert responses[-1].usage.completion_tokens == 3
        off_loop = recorder.threads_for(100)
        assert off_loop and loop_thread not in off_loop
    finally:
        thread.close()


async def _thread_id() -> int:
    return threading.get_ident()


def test_the_engine_takes_a_prompt_tokenized_by_its_caller_and_checks_its_ids(engine):
    from tokenmill.engine import InvalidRequestError, SamplingParams

    params = SamplingParams(max_tokens=2)
    ids = engine.engine.tokenizer.encode(TEXT)
    prepared = engine.engine.prepare_request("t", TokenizedPrompt(TEXT, ids), params)
    assert prepared.prompt == TEXT and prepared.children[0].prompt_token_ids == ids
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        engine.engine.prepare_request("u", TokenizedPrompt(TEXT, [10**9]), params)
