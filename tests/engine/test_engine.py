"""Engine: stop conditions, n samples, seeds, logprobs and aborts, end to end on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.tiny_models import drain, hf_logits, random_prompts
from tokenmill.engine import InvalidRequestError, ModelConfig, SamplingParams
from tokenmill.engine.request import RequestStatus

PROMPT = "The quick brown fox"


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)


def generate(engine, prompt, rid: str = "r", **params):
    engine.add_request(rid, prompt, SamplingParams(**params))
    return drain(engine)[rid]


def clean_substring(text: str, start: int, length: int = 3) -> tuple[int, str]:
    """The first substring of printable ASCII at or after ``start`` whose first occurrence is where it is."""
    for i in range(start, len(text) - length):
        s = text[i : i + length]
        if all(32 < ord(c) < 127 for c in s) and text.find(s) == i:
            return i, s
    raise AssertionError(f"no clean substring in {text!r}")


def model_copy(tmp_path, folder, generation_config: dict):
    """The checkpoint (linked, not copied) with another generation_config.json."""
    out = tmp_path / "model"
    out.mkdir()
    for f in folder.iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f)
    (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


def assert_all_free(engine):
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_used_blocks == 0
    assert engine.scheduler.requests == {}
    engine.step()  # the runner hears about finished requests at the next step
    assert engine.runner.states == {}


# -- stop conditions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_exactly(engine, include):
    full = generate(engine, PROMPT, "full", max_tokens=30, ignore_eos=True).outputs[0]
    i, stop = clean_substring(full.text, 6)
    out = generate(
        engine, PROMPT, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=include
    )
    c = out.outputs[0]
    assert c.text == (full.text[: i + len(stop)] if include else full.text[:i])
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert len(c.token_ids) < len(full.token_ids), "generation must stop early"
    assert c.token_ids == full.token_ids[: len(c.token_ids)]
    assert_all_free(engine)


def test_earliest_of_several_stop_strings_wins(engine):
    full = generate(engine, PROMPT, "full", max_tokens=30, ignore_eos=True).outputs[0]
    i, early = clean_substring(full.text, 5)
    j, late = clean_substring(full.text, i + 4)
    c = generate(engine, PROMPT, max_tokens=30, ignore_eos=True, stop=[late, early]).outputs[0]
    assert c.text == full.text[:i] and c.stop_reason == early and j > i


def test_stop_token_ids_end_generation(engine):
    full = generate(engine, PROMPT, "full", max_tokens=16, ignore_eos=True).outputs[0].token_ids
    k = next(k for k in range(3, 16) if full[k] not in full[:k])
    c = generate(engine, PROMPT, max_tokens=16, ignore_eos=True, stop_token_ids=[full[k]]).outputs[0]
    assert c.token_ids == full[: k + 1]
    assert c.finish_reason == "stop" and c.stop_reason == full[k]
    # min_tokens holds the stop token back until k + 2 tokens are out: the sequence must change
    c = generate(engine, PROMPT, max_tokens=16, ignore_eos=True, stop_token_ids=[full[k]], min_tokens=k + 2)
    assert full[k] not in c.outputs[0].token_ids[: k + 2]


def test_eos_from_generation_config_and_min_tokens(tmp_path, tiny_llama, make_engine):
    """Make the k-th greedy token an EOS id (generation_config.json): generation stops there, min_tokens masks
    it, ignore_eos ignores it."""
    base = make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)
    full = generate(base, PROMPT, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    k = next(k for k in range(2, 16) if full[k] not in full[:k])
    folder = model_copy(tmp_path, tiny_llama, {"eos_token_id": [1, full[k]]})
    engine = make_engine(folder, kv_cache_memory=1 << 22, max_model_len=128)
    assert full[k] in engine.eos_token_ids

    c = generate(engine, PROMPT, "a", max_tokens=16).outputs[0]
    assert c.token_ids == full[: k + 1] and c.finish_reason == "stop" and c.stop_reason is None

    c = generate(engine, PROMPT, "b", max_tokens=16, min_tokens=k + 3).outputs[0]
    assert len(c.token_ids) >= k + 3
    assert not set(c.token_ids[: k + 3]) & engine.eos_token_ids
    assert c.token_ids[:k] == full[:k] and c.token_ids[k] != full[k]

    c = generate(engine, PROMPT, "c", max_tokens=16, ignore_eos=True).outputs[0]
    assert c.token_ids == full and c.finish_reason == "length"
    assert_all_free(engine)


def test_max_tokens_and_max_model_len(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=32)
    prompt = random_prompts([28])[0]
    c = generate(engine, prompt, max_tokens=100, ignore_eos=True).outputs[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"  # 28 + 4 = max_model_len
    c = generate(engine, prompt, "b", max_tokens=2, ignore_eos=True).outputs[0]
    assert len(c.token_ids) == 2 and c.finish_reason == "length"


# -- n samples, seeds, logprobs ----------------------------------------------------------------------------


def test_n_samples_come_back_as_one_request_output(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    engine.add_request("multi", PROMPT, params)
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out)
    assert {o.request_id for o in seen} == {"multi"}
    assert all(len(o.outputs) == 3 for o in seen)
    assert [o.finished for o in seen].count(True) == 1 and seen[-1].finished
    final = seen[-1]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) == 3, "samples should differ"
    assert final.metrics.num_output_tokens == 30
    assert_all_free(engine)

    again = generate(engine, PROMPT, "again", n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in final.outputs]
    greedy = generate(engine, PROMPT, "greedy", n=2, max_tokens=6, ignore_eos=True)
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_seeded_request_reproduces_across_batches_and_preemption(tiny_llama, make_engine):
    """Alone in one engine vs. last of five arrivals in an engine with another seed and 8 blocks of 16 tokens,
    where it gets preempted."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True)
    target = random_prompts([14], seed=20)[0]
    solo = make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=64)
    expected = generate(solo, target, **vars(params)).outputs[0].token_ids

    per_token = ModelConfig.from_pretrained(tiny_llama).kv_bytes_per_token
    busy = make_engine(tiny_llama, kv_cache_memory=8 * 16 * per_token, max_model_len=64, seed=123)
    others = random_prompts([10, 12, 13, 20], seed=21)
    for i, p in enumerate(others):
        busy.add_request(
            f"o{i}", p, SamplingParams(temperature=1.0 if i % 2 else 0.0, max_tokens=12, ignore_eos=True)
        )
        busy.step()
    busy.add_request("target", target, params)
    final = drain(busy)
    assert final["target"].outputs[0].token_ids == expected
    assert final["target"].metrics.num_preemptions >= 1
    assert_all_free(busy)


def test_logprobs_of_sampled_tokens_match_transformers(engine, tiny_llama):
    prompt = random_prompts([9], seed=30)[0]
    c = generate(engine, prompt, temperature=1.5, seed=3, max_tokens=12, ignore_eos=True, logprobs=5).outputs[
        0
    ]
    ref = torch.log_softmax(hf_logits(tiny_llama, prompt + c.token_ids), -1)
    ranks = []
    for j, lp in enumerate(c.logprobs):
        row = ref[len(prompt) + j - 1]
        assert lp.token_id == c.token_ids[j]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=2e-4)
        assert lp.rank == 1 + int((row > row[lp.token_id]).sum())
        assert list(lp.top) == row.topk(5).indices.tolist()
        ranks.append(lp.rank)
    assert max(ranks) > 1, "at temperature 1.5 some sampled token should not be the favourite"
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs), abs=1e-5)


# -- abort ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding"])
def test_abort_in_each_state_frees_everything(state, tiny_llama, make_engine):
    """max_num_seqs 2 and an 8-token budget: a third request waits; a 40-token prompt prefills over 5
    steps."""
    engine = make_engine(
        tiny_llama, kv_cache_memory=1 << 22, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=8
    )
    short, long = random_prompts([4, 40], seed=40)
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    if state == "waiting":
        engine.add_request("a", short, greedy)
        engine.add_request("b", short, greedy)
        engine.add_request("victim", long, greedy)
        engine.step()
        assert engine.stats().num_waiting == 1
    elif state == "prefilling":
        engine.add_request("a", short, greedy)
        engine.add_request("victim", long, greedy)
        engine.step()
        engine.step()
        (victim,) = engine.requests_of("victim")
        assert 0 < victim.num_computed_tokens < victim.num_prompt_tokens
    else:
        engine.add_request("a", short, greedy)
        engine.add_request("victim", short, SamplingParams(max_tokens=50, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine.requests_of("victim")[0].num_output_tokens >= 1
    (victim_request,) = engine.requests_of("victim")
    assert engine.kv_cache.num_used_blocks > 0

    assert engine.abort("victim") is True
    assert victim_request.status == RequestStatus.FINISHED_ABORTED
    assert engine.kv_cache.block_table(victim_request.request_id) == []
    assert "victim" not in engine.output_processor
    assert engine.abort("victim") is False
    final = drain(engine)
    assert "victim" not in final or not final["victim"].finished
    solo = make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)
    for rid in ("a", "b") if state == "waiting" else ("a",):
        assert (
            final[rid].outputs[0].token_ids == generate(solo, short, rid, **vars(greedy)).outputs[0].token_ids
        )
    assert_all_free(engine)
    # The id can be used again once it is gone.
    assert generate(engine, short, "victim", max_tokens=2).finished


def test_abort_of_unknown_request_is_false(engine):
    assert engine.abort("nope") is False


def test_request_ids_must_be_unique_while_in_flight(engine):
    engine.add_request("same", PROMPT, SamplingParams(max_tokens=3))
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("same", PROMPT, SamplingParams(max_tokens=3))
    assert e.value.field == "request_id"
    drain(engine)
    assert_all_free(engine)


def test_generated_ids_are_unique(engine):
    ids = {engine.add_request(None, PROMPT, SamplingParams(max_tokens=2)) for _ in range(3)}
    assert len(ids) == 3
    assert set(drain(engine)) == ids


def test_metrics_and_stats(engine):
    out = generate(engine, PROMPT, max_tokens=5, ignore_eos=True)
    m = out.metrics
    assert m.num_prompt_tokens == len(engine.tokenizer.encode(PROMPT)) == len(out.prompt_token_ids)
    assert m.num_output_tokens == 5 and m.num_preemptions == 0
    assert (
        m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    )
    assert m.time_to_first_token >= 0 and m.mean_inter_token_latency >= 0 and m.e2e_latency >= m.queue_time
    assert out.prompt == PROMPT and out.text == out.outputs[0].text
    s = engine.stats()
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)
    assert s.kv_blocks_total == engine.kv_plan.num_usable_blocks


def test_default_sampling_params_follow_generation_config(tmp_path, tiny_llama, make_engine):
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    engine = make_engine(model_copy(tmp_path, tiny_llama, gen), kv_cache_memory=1 << 22, max_model_len=64)
    p = engine.default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.6, 0.9, 20, 1.1, None)
    # No params: up to max_model_len tokens with those defaults.
    engine.add_request("r", random_prompts([60])[0])
    out = drain(engine)["r"]
    assert len(out.outputs[0].token_ids) <= 4


def test_generation_config_top_k_minus_one_means_no_top_k(tmp_path, tiny_llama, make_engine):
    gen = {"do_sample": True, "temperature": 0.7, "top_k": -1}
    engine = make_engine(model_copy(tmp_path, tiny_llama, gen), kv_cache_memory=1 << 22, max_model_len=64)
    engine.add_request("r", PROMPT)
    assert drain(engine)["r"].finished


def test_abort_of_n_samples_frees_every_sample(engine):
    engine.add_request("multi", PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_running == 4 and engine.kv_cache.num_used_blocks >= 4
    assert engine.abort("multi") is True
    assert engine.kv_cache.num_used_blocks == 0 and engine.stats().num_running == 0
    assert_all_free(engine)


# -- stress: random workloads on a tight pool ------------------------------------------------------------

WORKLOAD = st.lists(
    st.tuples(
        st.integers(0, 12),  # arrival step
        st.integers(1, 40),  # prompt length
        st.integers(1, 24),  # max_tokens
        st.sampled_from(["greedy", "seeded", "random", "n2"]),
        st.one_of(st.none(), st.integers(0, 20)),  # abort at this step, if any
    ),
    min_size=2,
    max_size=7,
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=WORKLOAD,
    block_size=st.sampled_from([8, 16]),
    spare_blocks=st.integers(0, 2),
    budget=st.sampled_from([5, 16, 200]),
    max_num_seqs=st.integers(1, 5),
)
def test_random_workloads_finish_reproducibly_without_leaks(
    tiny_llama, workload, block_size, spare_blocks, budget, max_num_seqs
):
    """Arrivals, aborts, chunked prefill and preemption at random: blocks stay consistent at every step,
    everything ends free, and greedy or seeded requests produce what they produce alone."""
    from tokenmill.engine import Engine, EngineConfig

    max_model_len = 64
    per_token = ModelConfig.from_pretrained(tiny_llama).kv_bytes_per_token
    num_blocks = 1 + max_model_len // block_size + spare_blocks
    engine = Engine(
        EngineConfig(
            model=str(tiny_llama),
            device="cpu",
            kv_cache_memory=num_blocks * block_size * per_token,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            seed=7,
        )
    )
    prompts = random_prompts([w[1] for w in workload], seed=len(workload))
    params = {}
    for i, (_, _, max_tokens, kind, _) in enumerate(workload):
        params[f"w{i}"] = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.0 if kind == "greedy" else 1.0,
            seed=100 + i if kind in ("seeded", "n2") else None,
            n=2 if kind == "n2" else 1,
        )
    final, aborted = {}, set()
    for step in range(400):
        for i, (arrive, *_rest) in enumerate(workload):
            if arrive == step:
                engine.add_request(f"w{i}", prompts[i], params[f"w{i}"])
        for i, w in enumerate(workload):
            if w[4] is not None and w[4] == step and f"w{i}" not in final and engine.abort(f"w{i}"):
                aborted.add(f"w{i}")
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        engine.kv_cache.check_invariants()
        if step > 12 and not engine.has_unfinished_requests():
            break
    event(f"preemptions: {min(engine.stats().num_preemptions, 1)}, aborts: {min(len(aborted), 1)}")
    assert set(final) | aborted == set(params) and not set(final) & aborted
    assert engine.kv_cache.num_used_blocks == 0 and engine.scheduler.requests == {}
    engine.step()
    assert engine.runner.states == {}

    reference = Engine(
        EngineConfig(model=str(tiny_llama), device="cpu", kv_cache_memory=1 << 22, max_model_len=64)
    )
    for rid, out in final.items():
        p = params[rid]
        assert all(
            len(c.token_ids) == min(p.max_tokens, max_model_len - len(out.prompt_token_ids))
            for c in out.outputs
        )
        if p.seed is not None or p.temperature == 0:
            reference.add_request(rid, out.prompt_token_ids, p)
            alone = drain(reference)[rid]
            assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs], rid
