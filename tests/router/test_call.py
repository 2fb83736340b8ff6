"""What the router estimates a request will use: every prompt of a batch, every sequence, and never
more than a worker could be asked for."""

from __future__ import annotations

import pytest

from tokenmill.router.call import MAX_OUTPUT_TOKENS, asked_output, estimate_tokens, sequences
from tokenmill.router.prefix_index import prompt_text


def estimate(request: dict) -> tuple[int, int]:
    return estimate_tokens(request, prompt_text(request))  # as the router's app does


@pytest.mark.parametrize(
    ("request_body", "count"),
    [
        ({"prompt": "Hi"}, 1),
        ({"prompt": "Hi", "n": 3}, 3),
        ({"prompt": ["a", "b", "c"], "n": 2}, 6),  # a batch: every prompt, n each
        ({"prompt": [[1, 2], [3]], "n": 2}, 4),  # a batch of token-id prompts
        ({"prompt": [1, 2, 3], "n": 2}, 2),  # one prompt of token ids
        ({"prompt": ["a", "b"], "n": 2, "best_of": 5}, 10),  # best_of: generated, n returned
        ({"messages": [{"role": "user", "content": "Hi"}], "n": 4}, 4),
        ({"prompt": "Hi", "n": True}, 1),  # not a count: the worker's to refuse
        ({"prompt": "Hi", "n": "6"}, 1),
    ],
)
def test_sequences_are_every_prompt_times_its_choices(request_body, count):
    assert sequences(request_body) == count


def test_a_batch_with_n_is_estimated_for_every_prompt_and_every_choice():
    prompts = [f"prompt number {i} " * 4 for i in range(20)]
    one_prompt, _ = estimate({"prompt": prompts[0], "max_tokens": 100})
    prompt, output = estimate({"prompt": prompts, "max_tokens": 100, "n": 6})
    assert output == 20 * 6 * 100
    assert prompt >= 20 * one_prompt  # all the prompts (their JSON list errs high)
    ids, ids_output = estimate({"prompt": [[7] * 30, [7] * 50], "max_tokens": 8, "n": 3})
    assert (ids, ids_output) == (80, 2 * 3 * 8)  # token ids are counted, not their JSON's characters
    assert asked_output({"prompt": prompts, "max_tokens": 100, "n": 6}) == 12_000
    assert asked_output({"prompt": prompts, "n": 6}) is None  # names no max_tokens
    _, default = estimate({"prompt": prompts, "n": 6})
    assert default == 120 * 256  # the load estimate's default, per sequence


def test_max_completion_tokens_wins_and_a_null_one_falls_back_to_max_tokens():
    assert asked_output({"max_completion_tokens": 10, "max_tokens": 99}) == 10
    assert asked_output({"max_completion_tokens": None, "max_tokens": 99}) == 99  # as the worker reads it
    assert asked_output({"max_tokens": 0}) is None and asked_output({"max_tokens": 1.5}) is None


@pytest.mark.parametrize(
    "request_body",
    [
        {"prompt": "Hi", "max_tokens": 10**23},
        {"prompt": ["a"] * 1000, "max_tokens": 2**31 - 1, "n": 128},
        {"prompt": "Hi", "max_tokens": 16, "n": 10**23},
        {"prompt": "Hi", "n": 10**23},  # the default estimate too
    ],
)
def test_a_silly_ask_is_counted_at_most_what_a_worker_can_be_asked(request_body):
    _, output = estimate(request_body)
    assert 0 < output <= MAX_OUTPUT_TOKENS
    asked = asked_output(request_body)
    assert asked is None or asked <= MAX_OUTPUT_TOKENS
