"""The official ``openai`` package against a real ``tokenmill serve``: what users' code does."""

from __future__ import annotations

import openai
import pytest

from tokenmill import LLM, SamplingParams

PROMPT = "ROMEO: What light through yonder window breaks?"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> LLM:
    """The same demo model in-process: what the server must reproduce."""
    return LLM()


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo"]


def test_completion_matches_the_engine_token_for_token(client, reference):
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    want = reference.generate([PROMPT], SamplingParams(max_tokens=24))[0].outputs[0]
    assert resp.choices[0].text == want.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 24
    assert resp.usage.prompt_tokens == len(reference.engine.tokenizer.encode(PROMPT))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="demo",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_streams_role_with_the_first_token(client):
    messages = [{"role": "user", "content": "Tell me of Verona."}]
    whole = client.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_completion_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content  # the first token rides with the role
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    # continuous usage: every chunk says how far along the request is
    assert [c.usage.completion_tokens for c in chunks[:3]] == [1, 2, 3]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16


def test_max_tokens_and_max_completion_tokens_are_the_same_limit(client):
    messages = [{"role": "user", "content": "Hi"}]
    a = client.chat.completions.create(model="demo", messages=messages, max_tokens=5, temperature=0)
    b = client.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=5, temperature=0
    )
    assert a.usage.completion_tokens == b.usage.completion_tokens == 5
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_ends_the_text_before_it(client):
    free = (
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    )
    stop = free.strip().split()[2]
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == free[: free.index(stop)]
    assert stop not in choice.text


def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = dict(model="demo", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different samples, not one repeated
    assert a.usage.completion_tokens == 36


def test_streamed_n_samples_each_start_with_their_role(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    roles: dict[int, list[str | None]] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            roles[c.index].append(c.delta.role)
    for seen in roles.values():
        assert seen[0] == "assistant" and set(seen[1:]) <= {None}


def test_streamed_n_samples_come_one_choice_a_chunk_and_join_to_the_whole_answers(client):
    """OpenAI and vLLM send each choice in a chunk of its own; tools read choices[0] of a chunk."""
    kwargs = dict(model="demo", max_tokens=6, n=2, temperature=1.0, seed=5)
    whole = client.completions.create(prompt=PROMPT, **kwargs)
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(prompt=PROMPT, stream=True, **kwargs):
        assert len(chunk.choices) == 1
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    messages = [{"role": "user", "content": "Hi"}]
    whole_chat = client.chat.completions.create(messages=messages, **kwargs)
    contents = {0: "", 1: ""}
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
        assert len(chunk.choices) == 1
        contents[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert [contents[0], contents[1]] == [c.message.content for c in whole_chat.choices]


def test_streamed_logprob_offsets_are_the_whole_answers_with_a_stop_string(client):
    """Text held back while it might begin a stop string comes out after its tokens; the offsets
    of a stream counted the text sent, and fell out of step with the tokens."""
    kwargs = dict(model="demo", prompt="ROMEO:", max_tokens=8, temperature=0, stop="zzz", logprobs=0)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        tokens += chunk.choices[0].logprobs.tokens
        offsets += chunk.choices[0].logprobs.text_offset
    assert (tokens, offsets) == (whole.tokens, whole.text_offset)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_completion_logprobs(client, reference):
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    want = reference.generate([PROMPT], SamplingParams(max_tokens=6, logprobs=3))[0].outputs[0].logprobs
    assert lp.token_logprobs == pytest.approx([w.logprob for w in want], abs=1e-4)
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert len(top) >= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: chosen is top


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert bytes(t.bytes).decode() == t.token


def test_batch_of_prompts_gives_choices_in_order(client):
    prompts = ["ROMEO:", "JULIET: Good night"]
    resp = client.completions.create(model="demo", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model="demo", prompt=p, max_tokens=4, temperature=0) for p in prompts]
    assert [resp.choices[0].text, resp.choices[2].text] == [s.choices[0].text for s in single]


def test_token_id_prompt_and_echo(client, reference):
    ids = reference.engine.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert by_text.choices[0].text == PROMPT + by_ids.choices[0].text
    streamed = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == by_text.choices[0].text


def test_extras_are_accepted(client):
    resp = client.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="team-a",
        extra_body={
            "priority": 3,
            "top_k": 20,
            "min_p": 0.05,
            "min_tokens": 8,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "cache_salt": "team-a",
        },
        extra_headers={"x-tokenmill-priority": "5"},
    )
    assert resp.usage.completion_tokens == 8


# -- errors ----------------------------------------------------------------------------------


def test_invalid_parameter_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_body={"min_tokens": 5},
        )
    assert e.value.body["param"] == "min_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "Hi"}])
    assert e.value.body["param"] == "messages[0].role"


def test_prompt_over_the_context_length_is_a_400_with_both_numbers(client, reference):
    long_prompt = "ROMEO " * 3000
    n = len(reference.engine.tokenizer.encode(long_prompt))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert str(n) in e.value.body["message"] and "1024" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": long_prompt}])
    assert e.value.body["param"] == "messages" and "1024" in e.value.body["message"]


def test_max_tokens_past_the_context_is_a_400_as_vllm_words_it(client, reference):
    prompt = "ROMEO " * 300
    n = len(reference.engine.tokenizer.encode(prompt))
    room = 1024 - n
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=prompt, max_tokens=room + 1)
    body = e.value.body
    assert body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    assert body["message"].startswith(f"'max_tokens' is too large: {room + 1}. ")
    assert f"maximum context length is 1024 tokens and your request has {n} input tokens" in body["message"]
    messages = [{"role": "user", "content": prompt}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=5000)
    assert e.value.body["param"] == "max_completion_tokens"
    assert e.value.body["message"].startswith("'max_completion_tokens' is too large: 5000. ")
    # What fits is served; so is a max_tokens cut to fit when the request asks for that.
    assert client.completions.create(model="demo", prompt=prompt, max_tokens=room).choices
    cut = client.completions.create(
        model="demo", prompt=prompt, max_tokens=room + 50, extra_body={"truncate_max_tokens": True}
    )
    assert cut.usage.prompt_tokens == n and cut.usage.completion_tokens <= room


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_unsupported_fields_are_refused_not_ignored(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, logit_bias={"5": 10})
    assert e.value.body["param"] == "logit_bias"
