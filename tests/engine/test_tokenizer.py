"""Tokenizer and chat templates: token for token what transformers produces from the same folder."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import InvalidRequestError, ModelLoadError
from tokenmill.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n\n",
    "héllo wörld — 日本語 😀👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "a<|end_of_text|>b",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime.\nJust one."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another 😀"},
    ],
]

# Exercises what transformers' renderer adds over plain jinja2: trim_blocks / lstrip_blocks whitespace,
# loop controls, tojson, raise_exception.
RICH_TEMPLATE = """{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% if not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
[SYS]{{ m['content'] | trim }}
    {% else %}
        {% if m['role'] == 'tool' %}{% continue %}{% endif %}
[{{ m['role'] | upper }}] {{ m['content'] | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text, add_special_tokens):
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    for skip in (True, False):
        assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_encode_matches_transformers_on_any_text(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]


def test_special_tokens_match_transformers(tokenizer, hf_tokenizer):
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 0
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id
    assert tokenizer.special_token_ids == frozenset(hf_tokenizer.all_special_ids) | {
        tokenizer.token_id("<|im_start|>"),
        tokenizer.token_id("<|im_end|>"),
    }
    assert tokenizer.vocab_size == len(hf_tokenizer)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [None, RICH_TEMPLATE], ids=["model", "rich"])
def test_chat_template_matches_transformers(
    tokenizer, hf_tokenizer, conversation, add_generation_prompt, template
):
    ours = tokenizer.apply_chat_template(conversation, add_generation_prompt, chat_template=template)
    theirs = hf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )
    assert ours == theirs
    ids = tokenizer.encode_chat(conversation, add_generation_prompt, chat_template=template)
    hf_ids = hf_tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=template
    )
    assert ids == (hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids)
    if template is None:
        assert ids.count(tokenizer.bos_token_id) == 1, (
            "the template writes BOS; encoding must not add another"
        )


def test_template_errors_are_invalid_requests(tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(InvalidRequestError, match="system message must come first") as e:
        tokenizer.apply_chat_template(msgs, chat_template=RICH_TEMPLATE)
    assert e.value.field == "messages"
    with pytest.raises(InvalidRequestError) as e:
        tokenizer.apply_chat_template([])
    assert e.value.field == "messages"
    with pytest.raises(InvalidRequestError) as e:
        tokenizer.apply_chat_template([{"content": "no role"}])
    assert e.value.field == "messages[0]"


def test_chat_template_jinja_file_wins_like_in_transformers(tmp_path, tokenizer_dir):
    import transformers

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)
    msgs = CONVERSATIONS[1]
    ours = Tokenizer(folder).apply_chat_template(msgs)
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs and ours.endswith("[ASSISTANT]")


def test_no_chat_template_says_what_to_do(tmp_path, tokenizer_dir):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="chat template") as e:
        Tokenizer(folder).apply_chat_template(CONVERSATIONS[0])
    assert e.value.field == "messages"


def test_missing_or_corrupt_tokenizer_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer(tmp_path)


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=200))
def test_a_texts_length_over_max_token_chars_never_overcounts_its_tokens(tokenizer, text):
    """The bound that refuses a text untokenized is a true lower bound on its tokens."""
    if tokenizer.max_token_chars is not None:
        assert len(tokenizer.encode(text, add_special_tokens=False)) >= len(text) / tokenizer.max_token_chars


def test_a_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(tokenizer_dir):
    from tokenmill.engine.errors import PromptTooLongError

    tok = Tokenizer(tokenizer_dir)
    assert tok.max_token_chars is not None  # byte-level BPE, no normalizer
    tok.max_model_len = 64
    fits = "a " * 60
    assert len(tok.encode(fits)) > 0
    huge = "a " * 5_000_000  # 10 MB: about 25 s to tokenize here
    with pytest.raises(PromptTooLongError, match="at least") as e:
        tok.encode(huge)
    assert e.value.field == "prompt"
    with pytest.raises(PromptTooLongError):
        tok.encode_chat([{"role": "user", "content": huge}])
