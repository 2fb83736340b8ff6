"""A max_tokens the context cannot hold after the prompt: cut to fit for the offline API (as vLLM's
``LLM``), refused with the numbers for a server that asks (as vLLM's OpenAI server)."""

from __future__ import annotations

import pytest

from tests.tiny_models import drain, random_prompts
from tokenmill.engine import InvalidRequestError, MaxTokensTooLargeError, SamplingParams

MAX_MODEL_LEN = 64


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(tiny_llama, kv_cache_memory=1 << 21, max_model_len=MAX_MODEL_LEN)


def test_refused_with_the_numbers_when_asked(engine):
    (prompt,) = random_prompts([50], seed=3)
    with pytest.raises(MaxTokensTooLargeError) as e:
        engine.prepare_request("r", prompt, SamplingParams(max_tokens=15), truncate_max_tokens=False)
    err = e.value
    assert isinstance(err, InvalidRequestError) and err.field == "max_tokens"
    assert (err.max_tokens, err.num_prompt_tokens, err.max_model_len) == (15, 50, MAX_MODEL_LEN)
    # vLLM's wording, which agents read the limit out of
    assert "'max_tokens' is too large: 15" in str(err)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in str(err) and "(15 > 64 - 50)" in str(err)
    assert err.message_for("max_completion_tokens").startswith("'max_completion_tokens' is too large: 15.")


def test_exactly_the_room_left_is_accepted_when_refusing(engine):
    (prompt,) = random_prompts([50], seed=3)
    prepared = engine.prepare_request("r", prompt, SamplingParams(max_tokens=14), truncate_max_tokens=False)
    assert prepared.children[0].max_tokens == 14
    # no max_tokens: up to the context, never refused
    unlimited = engine.prepare_request(
        "u", prompt, SamplingParams(max_tokens=None), truncate_max_tokens=False
    )
    assert unlimited.children[0].max_tokens == 14


def test_cut_to_fit_by_default(engine):
    (prompt,) = random_prompts([50], seed=3)
    engine.add_request("r", prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    out = drain(engine)["r"].outputs[0]
    assert len(out.token_ids) == MAX_MODEL_LEN - 50 and out.finish_reason == "length"
