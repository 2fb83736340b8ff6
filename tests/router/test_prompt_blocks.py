"""The kv policy's prompt hashing equals the worker's own: same tokens, same block hashes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenmill.engine.tokenizer as tokenizer_module
from tokenmill.engine.block_hash import hash_blocks
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.router.prompt_blocks import PromptHasher

DEMO = Path(tokenizer_module.__file__).parent / "demo_model"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
WORDS = ["Verona", " fair", "  two", "\n", "\n\n", " households", "ünï", "42", "!", " ", "\t", "x"]
TEXT = st.lists(st.sampled_from(WORDS + SPECIALS), max_size=80).map("".join)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEMO)


def blocks(hasher: PromptHasher, body: dict, block_size: int = 16):
    return asyncio.run(hasher.blocks(body, block_size))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=TEXT, question=TEXT, block_size=st.sampled_from([1, 4, 16]), salt=st.sampled_from([None, "t1"]))
def test_chat_prompts_hash_as_the_worker_hashes_them(tok, system, question, block_size, salt):
    hasher = PromptHasher(tok)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body = {"messages": messages, **({"cache_salt": salt} if salt else {})}
    ids = tok.encode_chat(messages)
    for _ in range(2):  # cold, then from the memo
        got = blocks(hasher, body, block_size)
        assert got is not None and got.num_tokens == len(ids)
        assert got.hashes == hash_blocks(ids, block_size, salt)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=TEXT, rest=TEXT)
def test_completion_prompts_hash_as_the_worker_hashes_them(tok, prefix, rest):
    hasher = PromptHasher(tok)
    for text in (prefix + rest, prefix + rest + "<|im_end|>" + rest):
        if not text:
            continue
        got = blocks(hasher, {"prompt": text})
        ids = tok.encode(text)  # with BOS, as the engine tokenizes a completion prompt
        assert got is not None and (got.num_tokens, got.hashes) == (len(ids), hash_blocks(ids, 16))


def test_a_shared_system_prompt_is_tokenized_once(tok):
    hasher = PromptHasher(tok)
    system = "Speak as the chorus of a play set in fair Verona. " * 200
    for i in range(5):
        body = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Scene {i}"}]
        }
        ids = tok.encode_chat(body["messages"])
        assert blocks(hasher, body).hashes == hash_blocks(ids, 16)
    assert hasher.memo_hits == 4


def test_token_id_prompts_and_batches_use_the_ids_or_the_first_prompt(tok):
    hasher = PromptHasher(tok)
    ids = list(range(5, 45))
    assert blocks(hasher, {"prompt": ids}).hashes == hash_blocks(ids, 16)
    assert blocks(hasher, {"prompt": [ids, [1, 2]]}).hashes == hash_blocks(ids, 16)
    assert blocks(hasher, {"prompt": ["Hello there, " * 20, "x"]}).hashes == hash_blocks(
        tok.encode("Hello there, " * 20), 16
    )


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": [True, 2]},
        {"prompt": 7},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": "hi"},
        {"nothing": 1},
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": 1}},
    ],
)
def test_bodies_the_worker_would_refuse_give_no_blocks(tok, body):
    assert blocks(PromptHasher(tok), body) is None


def test_a_tokenizer_that_tokenizes_its_first_piece_apart_is_never_cut(tmp_path):
    """Metaspace with prepend_scheme="first" puts "▁" before the text's first piece only: cutting
    after an added token would add one more. The probe catches it and the text goes whole."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "▁hello": 2, "hello": 3, "▁world": 4, "world": 5, "▁": 6}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.add_special_tokens(["<s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    tok = Tokenizer(tmp_path)
    text = "hello<s>world hello"
    assert tok.encode(text) != [i for p in ("hello<s>", "world hello") for i in tok.encode(p)]
    hasher = PromptHasher(tok)
    assert hasher._cut_at is None
    got = asyncio.run(hasher.text_blocks(text, True, 1))
    assert got.hashes == hash_blocks(tok.encode(text), 1)


def test_a_long_new_prompt_is_hashed_in_the_background_without_waiting(tok):
    hasher = PromptHasher(tok)
    system = "Speak as the chorus of a play set in fair Verona. " * 400  # ~20k characters
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Scene 1"}]

    async def go():
        assert await hasher.blocks({"messages": messages}, 16, wait=False) is None  # cold: not now
        await asyncio.gather(*hasher._warming.values())
        messages[1]["content"] = "Scene 2"
        return await hasher.blocks({"messages": messages}, 16, wait=False)  # warm: at once

    got = asyncio.run(go())
    assert got is not None and got.hashes == hash_blocks(tok.encode_chat(messages), 16)
    assert hasher.memo_hits == 1
