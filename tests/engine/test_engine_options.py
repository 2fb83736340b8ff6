"""Engine options of the wrong type or beyond the machine: a typed error naming the option.

Each of these got past ``EngineConfig.validate`` before and failed later with a bare
TypeError (``block_size=16.0``, ``max_num_batched_tokens="abc"``, ``device=None``,
``model=123``), a traceback at start-up (a KV pool the device cannot allocate), or was
silently taken for something else (``enable_prefix_caching="no"`` is truthy, ``True`` is 1).
``LLM.generate`` raised a bare ValueError for a priority list of the wrong length.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tokenmill.engine import LLM, EngineConfig, InvalidRequestError, SamplingParams


def refused(**fields) -> str | None:
    """The field EngineConfig.validate names, or None if it accepts."""
    try:
        EngineConfig(**fields).validate()
    except InvalidRequestError as e:
        return e.field
    return None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 16.0),
        ("block_size", True),
        ("max_num_seqs", True),
        ("max_num_batched_tokens", "abc"),
        ("max_num_batched_tokens", 1.5),
        ("max_num_batched_tokens", True),
        ("max_itl", math.inf),
        ("max_itl", True),
        ("device", None),
        ("device", "meta"),
        ("device", "cuda:x"),
        ("model", 123),
        ("model", ""),
        ("enable_prefix_caching", "no"),
        ("kv_events", 1),
        ("timing_profile", "/nonexistent/profile.json"),  # (read only with max_itl or simulated)
        ("timing_profile", 5),
    ],
)
def test_wrong_types_are_refused_naming_the_option(field, value):
    assert refused(**{field: value}) == field


@pytest.mark.parametrize(
    "fields",
    [
        {"block_size": 8, "max_num_batched_tokens": 1, "max_itl": 0.05},
        {"device": "cpu"},
        {"device": "cuda:1"},  # whether a GPU is there is checked when the engine starts
        {"model": Path("/some/folder"), "enable_prefix_caching": False, "kv_events": True},
    ],
)
def test_good_values_still_pass(fields):
    assert refused(**fields) is None


def test_the_message_says_what_is_allowed():
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig(device="meta").validate()
    assert str(e.value) == "device='meta' is invalid: allowed auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("past_free", [1 << 30, 10**16])
def test_a_kv_pool_in_bytes_past_what_is_free_is_refused_before_it_is_allocated(tiny_llama, past_free):
    """A GiB past MemAvailable would be allocated (overcommit) and zeroed page by page until the
    kernel killed the process; 10 PB is past any address space."""
    from tokenmill.engine.memory import available_memory

    with pytest.raises(InvalidRequestError) as e:
        LLM(str(tiny_llama), device="cpu", kv_cache_memory=available_memory(torch.device("cpu")) + past_free)
    assert e.value.field == "kv_cache_memory"
    assert "GiB free on cpu after the weights" in str(e.value)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", kv_cache_memory=1 << 22, max_model_len=128)


@pytest.mark.parametrize("priority", [[1], [1, 2, 3], None, 1.0, True, "1"])
def test_generate_refuses_a_bad_priority_before_queuing_anything(llm, priority):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["a", "b"], SamplingParams(max_tokens=2), priority=priority)
    assert e.value.field == "priority"
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv_cache.num_used_blocks == 0


def test_generate_takes_one_priority_per_prompt(llm):
    outs = llm.generate(["a", "b"], SamplingParams(max_tokens=2, ignore_eos=True), priority=[3, -1])
    assert [o.metrics.priority for o in outs] == [3, -1]
    assert len(llm.generate(iter(["a"]), SamplingParams(max_tokens=1))) == 1  # any iterable of prompts


@pytest.mark.parametrize("prompts", [None, 5, 2.5])
def test_generate_refuses_prompts_that_are_not_prompts(llm, prompts):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompts, SamplingParams(max_tokens=2))
    assert e.value.field == "prompts"
