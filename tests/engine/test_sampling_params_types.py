"""SamplingParams refuses values of the wrong type with a typed error naming the field.

Python's bool is an int, so ``logprobs=True`` passed ``isinstance(x, int)``, reached torch's
``topk`` (which refuses a bool) in the middle of a step, and stopped the engine loop: every
request of an AsyncEngine then failed with EngineDeadError. A number where a list belongs
raised a bare TypeError from the constructor.
"""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.engine import AsyncEngine, EngineConfig, InvalidRequestError, SamplingParams


def refused(**fields) -> str | None:
    """The field SamplingParams names, or None if it accepts."""
    try:
        SamplingParams(**fields).validate(vocab_size=512)
    except InvalidRequestError as e:
        return e.field
    return None


@pytest.mark.parametrize("field", ["n", "top_k", "max_tokens", "min_tokens", "logprobs"])
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_count(field, value):
    assert refused(**{field: value}) == field


def test_a_bool_is_not_a_stop_token_id():
    assert refused(stop_token_ids=[True]) == "stop_token_ids"


@pytest.mark.parametrize("field", ["ignore_eos", "include_stop_str_in_output", "skip_special_tokens"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_take_only_true_or_false(field, value):
    assert refused(**{field: value}) == field


@pytest.mark.parametrize(("field", "value"), [("stop", 5), ("stop_token_ids", 5), ("stop_token_ids", "12")])
def test_a_scalar_where_a_list_belongs_is_a_typed_error(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


def test_the_list_forms_still_work():
    p = SamplingParams(stop="\n", stop_token_ids=(3, 4), logprobs=0, ignore_eos=True)
    p.validate(vocab_size=512)
    assert p.stop == ["\n"] and p.stop_token_ids == [3, 4]
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == []


def test_logprobs_true_is_refused_and_the_async_engine_keeps_serving(tiny_llama):
    async def run() -> str:
        config = EngineConfig(model=str(tiny_llama), device="cpu", kv_cache_memory=1 << 22, max_model_len=128)
        with AsyncEngine(config) as engine:
            with pytest.raises(InvalidRequestError) as e:
                async for _ in engine.generate("Hello", SamplingParams(max_tokens=2, logprobs=True)):
                    pass
            assert e.value.field == "logprobs"
            greedy = SamplingParams(max_tokens=2, ignore_eos=True)
            outs = [out async for out in engine.generate("Hello", greedy)]
            return outs[-1].outputs[0].finish_reason

    assert asyncio.run(run()) == "length"
