"""Bad input raises a typed error naming the field, costs nothing, and never disturbs other requests."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.tiny_models import VOCAB_SIZE, drain, random_prompts
from tokenmill.engine import (
    InsufficientKVCacheError,
    InvalidRequestError,
    ModelConfig,
    ModelLoadError,
    OutputKind,
    PromptTooLongError,
    SamplingParams,
)

MAX_MODEL_LEN = 64


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(tiny_llama, kv_cache_memory=1 << 21, max_model_len=MAX_MODEL_LEN)


BAD_PARAMS = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -3}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": 101.0}),
    ("min_p", {"min_p": -math.inf}),
    ("repetition_penalty", {"repetition_penalty": math.inf}),
    ("repetition_penalty", {"repetition_penalty": 100.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": -0.5}),
    ("top_k", {"top_k": -2}),
    ("min_p", {"min_p": 1.5}),
    ("n", {"n": 0}),
    ("n", {"n": 129}),
    ("seed", {"seed": "7"}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": -(2**63) - 1}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("stop", {"stop": [""]}),
    ("stop_token_ids", {"stop_token_ids": [VOCAB_SIZE]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("logprobs", {"logprobs": 21}),
]


def start_good_request(engine):
    """A request in flight while the bad ones arrive; returns its id."""
    engine.add_request("good", random_prompts([10], seed=1)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    engine.step()
    return "good"


def finish_and_check(engine, tiny_llama, make_engine):
    """The good request ends exactly as it would alone, and every block is back."""
    out = drain(engine)["good"]
    solo = make_engine(tiny_llama, kv_cache_memory=1 << 21, max_model_len=MAX_MODEL_LEN)
    solo.add_request("good", random_prompts([10], seed=1)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    assert out.outputs[0].token_ids == drain(solo)["good"].outputs[0].token_ids
    assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize(("field", "params"), BAD_PARAMS, ids=[f"{f}={v}" for f, v in BAD_PARAMS])
def test_bad_sampling_params_name_the_field(engine, tiny_llama, make_engine, field, params):
    start_good_request(engine)
    used = engine.kv_cache.num_used_blocks
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", "Hello", SamplingParams(**params))
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}=") and "allowed" in str(e.value)
    assert engine.kv_cache.num_used_blocks == used and engine.stats().num_waiting == 0
    assert "bad" not in engine.output_processor
    finish_and_check(engine, tiny_llama, make_engine)
    # The rejected id was never taken.
    engine.add_request("bad", "Hello", SamplingParams(max_tokens=2))
    assert drain(engine)["bad"].finished


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ("", "prompt"),
        ([], "prompt"),
        ([5, VOCAB_SIZE], "prompt_token_ids"),
        ([5, -1], "prompt_token_ids"),
        ([5, True], "prompt_token_ids"),  # the bad id is named
        ({"text": "hi"}, "prompt"),
        (None, "prompt"),
    ],
)
def test_bad_prompts_name_the_field(engine, tiny_llama, make_engine, prompt, field):
    start_good_request(engine)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", prompt, SamplingParams())
    assert e.value.field == field
    finish_and_check(engine, tiny_llama, make_engine)


def test_prompt_longer_than_max_model_len(engine, tiny_llama, make_engine):
    start_good_request(engine)
    fits, too_long = random_prompts([MAX_MODEL_LEN - 1, MAX_MODEL_LEN], seed=2)
    with pytest.raises(PromptTooLongError) as e:
        engine.add_request("bad", too_long, SamplingParams())
    err = e.value
    assert isinstance(err, InvalidRequestError) and err.field == "prompt"
    assert (err.num_prompt_tokens, err.max_model_len) == (MAX_MODEL_LEN, MAX_MODEL_LEN)
    assert f"{MAX_MODEL_LEN} tokens" in str(err) and f"max_model_len is {MAX_MODEL_LEN}" in str(err)
    with pytest.raises(PromptTooLongError):
        engine.add_request("bad", "word " * 200, SamplingParams())
    finish_and_check(engine, tiny_llama, make_engine)
    # One token less leaves room for exactly one output token.
    engine.add_request("fits", fits, SamplingParams(max_tokens=10, ignore_eos=True))
    out = drain(engine)["fits"].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_other_bad_arguments(engine):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("x", "Hello", {"max_tokens": 3})
    assert e.value.field == "sampling_params"
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("x", "Hello", SamplingParams(), priority="high")
    assert e.value.field == "priority"
    assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()


VALID = {
    "max_tokens": st.integers(1, 5),
    "temperature": st.one_of(st.just(0.0), st.floats(1e-7, 5.0), st.just(100.0)),
    "top_p": st.floats(1e-6, 1.0),
    "top_k": st.integers(-1, VOCAB_SIZE + 5),
    "min_p": st.floats(0.0, 1.0),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "repetition_penalty": st.floats(0.01, 5.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "min_tokens": st.integers(0, 5),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=2),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "n": st.integers(1, 3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "output_kind": st.sampled_from(list(OutputKind)),
}
INVALID = {
    "max_tokens": st.integers(max_value=0),
    "temperature": st.one_of(
        st.floats(max_value=-1e-9), st.floats(min_value=100.0, exclude_min=True), st.just(math.nan)
    ),
    "top_p": st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)
    ),
    "top_k": st.integers(max_value=-2),
    "min_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0, exclude_min=True)),
    "repetition_penalty": st.one_of(st.floats(max_value=0.0), st.floats(min_value=100.0, exclude_min=True)),
    "presence_penalty": st.one_of(
        st.floats(min_value=2.0, exclude_min=True), st.floats(max_value=-2.0, exclude_max=True)
    ),
    "stop": st.just([""]),
    "stop_token_ids": st.lists(st.integers(VOCAB_SIZE, 10**9), min_size=1, max_size=2),
    "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=21)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=129)),
    "seed": st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)),
}
ONE_BAD_FIELD = st.one_of(
    st.just({}), st.sampled_from(sorted(INVALID)).flatmap(lambda k: INVALID[k].map(lambda v: {k: v}))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.fixed_dictionaries({}, optional=VALID),
    bad=ONE_BAD_FIELD,
    prompt_len=st.one_of(st.integers(1, MAX_MODEL_LEN - 1), st.sampled_from([0, MAX_MODEL_LEN, 100])),
)
def test_any_request_is_served_or_rejected_without_leaks(engine, params, bad, prompt_len):
    """Valid values of every field together are served; one bad field (or a bad prompt) is rejected naming it,
    with nothing allocated. Never a crash, never a leak."""
    params.setdefault("max_tokens", 4)
    params["min_tokens"] = min(params.get("min_tokens", 0), params["max_tokens"])
    params.update(bad)
    prompt = random_prompts([prompt_len], seed=prompt_len)[0]
    prompt_ok = 0 < prompt_len < MAX_MODEL_LEN
    try:
        sp = SamplingParams(**params)
        engine.add_request("fuzz", prompt, sp)
    except InvalidRequestError as e:
        event(f"rejected: {e.field}")
        assert e.field in str(e)
        if bad:
            assert e.field == next(iter(bad))
        else:
            assert not prompt_ok and e.field == "prompt"
    else:
        assert not bad and prompt_ok, "an invalid request was accepted"
        event("served")
        outs = drain(engine)
        if sp.output_kind != OutputKind.FINAL_ONLY or "fuzz" in outs:
            out = outs["fuzz"]
            assert out.finished and len(out.outputs) == sp.n
            for c in out.outputs:
                assert all(0 <= t < VOCAB_SIZE for t in c.token_ids)
                if sp.output_kind != OutputKind.DELTA:
                    assert 1 <= len(c.token_ids) <= sp.max_tokens
                    assert sp.logprobs is None or len(c.logprobs) == len(c.token_ids)
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_used_blocks == 0
    engine.kv_cache.check_invariants()


# -- bad models --------------------------------------------------------------------------------


def copy_model(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def test_missing_model_folder(tmp_path, make_engine):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        make_engine(missing)


def test_truncated_safetensors(tmp_path, tiny_llama, make_engine):
    folder = copy_model(tmp_path, tiny_llama)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) - 100, len(data) // 2, 50):
        weights.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=r"model\.safetensors.*is the file complete"):
            make_engine(folder, kv_cache_memory=1 << 21)


def test_no_weights(tmp_path, tiny_llama, make_engine):
    folder = copy_model(tmp_path, tiny_llama)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        make_engine(folder, kv_cache_memory=1 << 21)


def test_missing_shard_and_missing_tensor(tmp_path, tiny_llama, make_engine):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tmp_path, tiny_llama)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[1:]}, folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names[1:]}}
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors"):
        make_engine(folder, kv_cache_memory=1 << 21)
    # Without the index the remaining file loads but lacks a tensor, which is named.
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match=re.escape(names[0].removeprefix("model."))):
        make_engine(folder, kv_cache_memory=1 << 21)


def test_wrong_shape_tensor(tmp_path, tiny_llama, make_engine):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tmp_path, tiny_llama)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].clone()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*shape"):
        make_engine(folder, kv_cache_memory=1 << 21)


def test_kv_cache_too_small_for_one_sequence(tiny_llama, make_engine):
    """max_model_len 64 = 4 blocks of 16, plus the null block: 5 blocks of 16 * 512 bytes = 40960 bytes."""
    per_block = 16 * ModelConfig.from_pretrained(tiny_llama).kv_bytes_per_token
    assert per_block == 8192
    with pytest.raises(InsufficientKVCacheError) as e:
        make_engine(tiny_llama, kv_cache_memory=5 * per_block - 1, max_model_len=MAX_MODEL_LEN)
    message = str(e.value)
    assert "3 blocks of 16 tokens (8192 bytes each)" in message
    assert "max_model_len=64 needs 4 blocks" in message
    assert "at least 40960 bytes" in message and "at most 48" in message
    engine = make_engine(tiny_llama, kv_cache_memory=5 * per_block, max_model_len=MAX_MODEL_LEN)
    assert engine.kv_plan.max_full_length_sequences == 1
    # Following the advice on max_model_len works too.
    make_engine(tiny_llama, kv_cache_memory=5 * per_block - 1, max_model_len=48)


# -- request ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["single_first", "multi_first"])
def test_user_ids_cannot_collide_with_sample_ids(engine, order):
    single = ("x#0", "hello there", SamplingParams(max_tokens=20, ignore_eos=True))
    multi = ("x", "another prompt", SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True))
    first, second = (single, multi) if order == "single_first" else (multi, single)
    engine.add_request(*first)
    engine.step()
    try:
        engine.add_request(*second)
    except InvalidRequestError as e:
        assert e.field == "request_id"  # refusing the id is fine too
    final = drain(engine)
    assert all(out.finished for out in final.values())
    assert engine.kv_cache.num_used_blocks == 0


def test_generated_ids_skip_ids_in_use(engine):
    engine.add_request("req-0", "hi", SamplingParams(max_tokens=2))
    rid = engine.add_request(None, "hi", SamplingParams(max_tokens=2))
    assert rid != "req-0" and set(drain(engine)) == {"req-0", rid}
