"""LLM: batch generation and chat, in prompt order, leaving the engine clean whatever happens."""

from __future__ import annotations

import pytest

from tests.tiny_models import drain, hf_greedy, random_prompts
from tokenmill.engine import LLM, InvalidRequestError, OutputKind, SamplingParams, TokenizedPrompt
from tokenmill.engine.loader import DEMO_MODEL_DIR

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", kv_cache_memory=1 << 22, max_model_len=128)


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.kv_cache.num_used_blocks == 0
    assert engine.scheduler.requests == {} and engine.output_processor._tracked == {}


def test_generate_returns_outputs_in_prompt_order(llm, tiny_llama):
    ids = random_prompts([30, 3, 12], seed=50)
    prompts = ["Hello world", ids[0], {"prompt": "def f(x):"}, {"prompt_token_ids": ids[1]}, ids[2]]
    outs = llm.generate(prompts, GREEDY)
    assert len(outs) == 5 and all(o.finished for o in outs)
    assert outs[0].prompt == "Hello world" and outs[1].prompt is None
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello world")
    assert outs[1].prompt_token_ids == ids[0] and outs[3].prompt_token_ids == ids[1]
    for o in outs:
        assert o.outputs[0].token_ids == hf_greedy(tiny_llama, o.prompt_token_ids, 6)
    assert_clean(llm)


def test_single_prompt_forms(llm):
    by_text = llm.generate("Hello", GREEDY)
    by_ids = llm.generate(llm.tokenizer.encode("Hello"), GREEDY)
    assert len(by_text) == len(by_ids) == 1
    assert by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
    assert llm.generate([], GREEDY) == []


def test_one_params_per_prompt(llm):
    outs = llm.generate(
        ["a", "b"],
        [SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)],
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["a", "b"], [GREEDY])
    assert e.value.field == "sampling_params"


def test_streaming_kinds_are_ignored_by_generate(llm):
    delta = SamplingParams(max_tokens=6, ignore_eos=True, output_kind=OutputKind.DELTA)
    assert (
        llm.generate("Hello", delta)[0].outputs[0].token_ids
        == llm.generate("Hello", GREEDY)[0].outputs[0].token_ids
    )
    assert delta.output_kind == OutputKind.DELTA, "the caller's params are not modified"


def test_a_bad_prompt_rejects_the_whole_batch_and_leaves_nothing_queued(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["fine", "also fine", ""], GREEDY)
    assert e.value.field == "prompt"
    assert_clean(llm)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([{"text": "wrong key"}], GREEDY)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError):
        llm.generate(["ok", "ok"], SamplingParams(temperature=-1))
    assert_clean(llm)
    assert llm.generate(["fine"], GREEDY)[0].finished


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda llm: llm.generate(["a"], {"max_tokens": 2}), "sampling_params"),  # was an AttributeError
        (lambda llm: llm.generate(["a"], [GREEDY, "greedy"][1:]), "sampling_params"),
        (lambda llm: llm.generate([[5.5]]), "prompt_token_ids"),
        (lambda llm: llm.chat("hello"), "messages"),  # was "messages='h' is invalid"
        (lambda llm: llm.chat([]), "messages"),
        (lambda llm: llm.chat([[{"role": "user", "content": "hi"}], "x"]), "messages"),
        (lambda llm: SamplingParams(output_kind="x"), "output_kind"),
    ],
)
def test_api_misuse_is_an_error_naming_the_argument(llm, call, field):
    with pytest.raises(InvalidRequestError) as e:
        call(llm)
    assert e.value.field == field
    assert_clean(llm)


def test_interrupt_mid_generation_leaves_the_engine_clean(llm, monkeypatch):
    calls = {"n": 0}
    forward = llm.engine.model.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.engine.model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["one", "two", "three"], SamplingParams(max_tokens=10, ignore_eos=True))
    assert_clean(llm)
    out = llm.generate(["one"], GREEDY)
    assert out[0].finished
    llm.engine.step()  # the runner drops finished requests' state at the next step
    assert llm.engine.runner.states == {}


def test_chat_renders_the_template(llm):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    one = llm.chat(conv, GREEDY)
    assert len(one) == 1
    expected_ids = llm.tokenizer.encode_chat(conv, add_generation_prompt=True)
    assert one[0].prompt_token_ids == expected_ids
    assert llm.tokenizer.decode(expected_ids, False).endswith("<|im_start|>assistant\n")
    assert one[0].outputs[0].token_ids == llm.generate(expected_ids, GREEDY)[0].outputs[0].token_ids

    two = llm.chat([conv, [{"role": "user", "content": "Other"}]], GREEDY)
    assert len(two) == 2 and two[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    custom = llm.chat(conv, GREEDY, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert custom[0].prompt_token_ids == llm.tokenizer.encode("Be brief.Hi", add_special_tokens=False)


def test_chat_takes_priorities_as_generate_does(llm, monkeypatch):
    seen: list[int] = []
    add = llm.engine.add_request

    def recording(*args, priority=0, **kw):
        seen.append(priority)
        return add(*args, priority=priority, **kw)

    monkeypatch.setattr(llm.engine, "add_request", recording)
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Other"}]]
    assert all(o.finished for o in llm.chat(conversations, GREEDY, priority=[0, 5]))
    assert seen == [0, 5]
    llm.chat(conversations[0], GREEDY, priority=3)
    assert seen[-1] == 3
    with pytest.raises(InvalidRequestError, match="priority"):
        llm.chat(conversations, GREEDY, priority=[1, 2, 3])


def test_a_prompt_tokenized_by_the_caller_runs_as_its_text_does(llm):
    ids = llm.tokenizer.encode("Hello there")
    tokenized = llm.generate(TokenizedPrompt("Hello there", ids), GREEDY)[0]
    assert tokenized.prompt == "Hello there" and tokenized.prompt_token_ids == ids
    assert tokenized.outputs[0].token_ids == llm.generate("Hello there", GREEDY)[0].outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate([TokenizedPrompt("x", [])], GREEDY)


def test_properties(llm):
    assert llm.kv_plan.block_size == 16 and llm.kv_plan.max_model_len == 128
    assert llm.kv_plan.max_full_length_sequences >= 1
    assert llm.tokenizer.eos_token_id == 1
    assert llm.get_default_sampling_params().max_tokens is None


def test_priorities_are_accepted_per_prompt(llm):
    outs = llm.generate(["a", "b"], GREEDY, priority=[0, 5])
    assert all(o.finished for o in outs)


@pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "config.json").is_file(),
    reason="the demo model is not trained yet (scripts/train_demo_model.py writes it)",
)
def test_default_demo_model_loads():
    llm = LLM(device="cpu", kv_cache_memory=1 << 24)
    out = llm.generate("ROMEO:", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4


def test_llm_and_engine_agree(llm, tiny_llama, make_engine):
    engine = make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)
    engine.add_request("x", "Hello", GREEDY)
    assert drain(engine)["x"].outputs[0].token_ids == llm.generate("Hello", GREEDY)[0].outputs[0].token_ids
