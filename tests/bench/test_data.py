"""Request data: exact prompt lengths by the server's or a local tokenizer, files with clear errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from tokenmill.bench import data
from tokenmill.bench.data import Length
from tokenmill.bench.mock_server import MockServer
from tokenmill.bench.specs import DataSource, check_endpoint
from tokenmill.bench.tokenizers import LocalTokenizer, server_tokenizer
from tokenmill.client import HTTPTransport


def with_server_tokenizer(work):
    async def main():
        async with MockServer() as server, HTTPTransport(server.url) as http:
            tok = await server_tokenizer(http, "mock")
            assert tok is not None
            return await work(tok)

    return asyncio.run(main())


def test_synthetic_prompts_have_exact_lengths_through_the_server_tokenizer():
    specs = with_server_tokenizer(lambda tok: data.synthetic(tok, 20, Length(30, 60), Length(8, 8), seed=3))
    assert all(30 <= s.prompt_tokens <= 60 and len(s.prompt.split()) == s.prompt_tokens for s in specs)
    assert len({s.prompt_tokens for s in specs}) > 1 and {s.output_tokens for s in specs} == {8}
    assert len({s.prompt for s in specs}) == 20  # no two alike: no prefix shared by chance


def test_synthetic_prompts_have_exact_lengths_through_a_local_tokenizer(tokenizer_dir):
    tok = LocalTokenizer(tokenizer_dir)
    specs = asyncio.run(data.synthetic(tok, 10, Length(50, 50), Length(4, 16), seed=0))
    for s in specs:
        assert s.prompt_tokens == 50 == len(asyncio.run(tok.encode(s.prompt)))
        assert 4 <= s.output_tokens <= 16


def test_the_same_seed_builds_the_same_requests(tokenizer_dir):
    tok = LocalTokenizer(tokenizer_dir)
    build = lambda: asyncio.run(data.synthetic(tok, 5, Length(20, 40), Length(1, 9), seed=7))  # noqa: E731
    assert build() == build()


def test_shared_prefix_groups_share_their_prefix_and_nothing_else():
    def build(tok):
        return data.shared_prefix(tok, 8, 2, Length(40, 40), Length(10, 10), Length(5, 5), seed=1)

    specs = with_server_tokenizer(build)
    prefixes = [s.prompt.split("\n")[0] for s in specs]
    assert [[m["content"] for m in s.messages] for s in specs] == [s.prompt.split("\n") for s in specs]
    assert all(s.messages[0]["role"] == "system" for s in specs)
    assert len(set(prefixes)) == 2 and all(s.prompt_tokens == 50 for s in specs)
    for s, prefix in zip(specs, prefixes, strict=True):  # the user names the group, the group the prefix
        assert prefix == prefixes[[x.user for x in specs].index(s.user)]
    assert {s.user for s in specs} == {"group-0", "group-1"}
    assert len({s.prompt for s in specs}) == 8  # unique suffixes


def test_shared_prefixes_draw_their_lengths_from_a_range(tokenizer_dir):
    tok = LocalTokenizer(tokenizer_dir)
    specs = asyncio.run(data.shared_prefix(tok, 40, 6, Length(30, 90), Length(5, 5), Length(1, 1), seed=3))
    lengths = {
        s.messages[0]["content"]: len(asyncio.run(tok.encode(s.messages[0]["content"]))) for s in specs
    }
    assert (
        len(lengths) == 6 and all(30 <= n <= 90 for n in lengths.values()) and len(set(lengths.values())) > 1
    )


def test_jsonl_prompts_and_conversations(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "hi", "output_tokens": 3, "user": "u1"},
        {"messages": [{"role": "user", "content": "yo"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    specs = data.from_jsonl(path, None)
    assert specs[0] == data.RequestSpec("hi", None, None, 3, "u1")
    assert specs[1].messages == rows[1]["messages"]
    assert len(data.from_jsonl(path, 1)) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "p.jsonl:2: not JSON"),
        ('{"text": "x"}', 'p.jsonl:2: needs "prompt"'),
        ('{"prompt": "x", "output_tokens": 0}', "p.jsonl:2: output_tokens"),
        ('{"prompt": "x", "output_tokens": true}', "p.jsonl:2: output_tokens must be an integer"),  # not 1
        ('{"prompt": "x", "prompt_tokens": "many"}', "p.jsonl:2: prompt_tokens must be an integer"),
        ('{"messages": [{"role": "user"}]}', 'p.jsonl:2: needs "prompt"'),  # no content: the server's 400
        ('{"messages": [{"content": "hi"}]}', 'p.jsonl:2: needs "prompt"'),
    ],
)
def test_a_bad_jsonl_line_is_named_by_number(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        data.from_jsonl(path, None)


def test_a_data_file_that_is_binary_or_a_folder_is_named(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b'{"prompt": "fine"}\n' + bytes(range(128, 256)) * 64)
    with pytest.raises(ValueError, match=r"model\.bin: not UTF-8 text"):
        data.from_jsonl(binary, None)
    with pytest.raises(ValueError, match=r"sg\.json: not UTF-8 text"):
        asyncio.run(data.from_sharegpt(binary.rename(tmp_path / "sg.json"), 4, None, 0))
    with pytest.raises(ValueError, match="is a folder"):
        DataSource("jsonl", Length(5, 5), Length(2, 2), file=tmp_path)


def test_sharegpt_takes_the_first_human_turn_and_the_reply_length(tmp_path):
    path = tmp_path / "sg.json"
    convs = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "x y"}],
        },
        {
            "id": "b",
            "conversations": [{"from": "gpt", "value": "starts wrong"}, {"from": "human", "value": "no"}],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "alone"}]},
    ]
    path.write_text(json.dumps(convs))
    specs = with_server_tokenizer(lambda tok: data.from_sharegpt(path, 10, tok, seed=0))
    assert specs == [data.RequestSpec("one two three", None, 3, 2, "a")]


@pytest.mark.parametrize("text", ["0", "abc", "5:2", "1:x"])
def test_bad_lengths_name_the_option(text):
    with pytest.raises(ValueError, match="--prompt-tokens"):
        Length.parse(text, "--prompt-tokens")


def test_a_trace_run_is_described_as_a_trace_replay():
    rows = [{"timestamp": 0.0, "input_tokens": 7, "output_tokens": 3}, {"timestamp": 1.0}]
    source = DataSource("synthetic", Length(512, 512), Length(128, 128), trace=rows)
    assert source.describe() == (
        "trace replay of 2 requests, synthetic text of the trace's lengths (else 512 -> 128 tokens)"
    )
    assert DataSource("synthetic", Length(5, 5), Length(2, 2), trace=rows[:1]).describe() == (
        "trace replay of 1 requests, synthetic text of the trace's lengths"
    )


def test_a_data_file_must_exist_and_go_with_a_file_source(tmp_path):
    with pytest.raises(
        ValueError, match="--data-file goes with --data jsonl or sharegpt, not --data synthetic"
    ):
        DataSource("synthetic", Length(5, 5), Length(2, 2), file=tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=r"--data-file .*missing\.jsonl: no such file"):
        DataSource("jsonl", Length(5, 5), Length(2, 2), file=tmp_path / "missing.jsonl")


def test_conversations_cannot_go_to_the_completions_endpoint():
    specs = [data.RequestSpec("hi"), data.RequestSpec(None, [{"role": "user", "content": "yo"}])]
    check_endpoint(specs, "chat")
    with pytest.raises(ValueError, match='request 2 of the data has only "messages": use --endpoint chat'):
        check_endpoint(specs, "completions")


def test_no_prefix_groups_names_the_option():
    """Before: "groups must be >= 1", an option nobody typed."""
    with pytest.raises(ValueError, match=r"^--prefix-groups must be >= 1, got 0"):
        asyncio.run(data.shared_prefix(None, 1, 0, Length(1, 1), Length(1, 1), Length(1, 1), seed=0))  # type: ignore[arg-type]
