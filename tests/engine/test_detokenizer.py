"""Incremental detokenization: byte-level pieces of multi-byte characters, stop strings, streamed deltas."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tiny_models import drain
from tokenmill.engine import OutputKind, SamplingParams
from tokenmill.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE = "héllo wörld — ça coûte 5 €; 日本語のテキスト; emoji 😀🎉🚀 and a family 👩‍👩‍👧‍👦 flag 🇯🇵 done"


def stream(tokenizer, prompt_ids, ids, **params):
    """Feed ``ids`` one token at a time; return the deltas and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    deltas = []
    for i, tid in enumerate(ids):
        detok.update([tid])
        deltas.append(detok.take_new_text(finished=i == len(ids) - 1))
    return deltas, detok


def test_multibyte_characters_split_over_tokens_never_emit_replacement_chars(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # The fixture's BPE has never seen most of these characters: they are split into byte tokens, several of
    # which decode alone to U+FFFD. Otherwise this test would prove nothing.
    broken = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert len(broken) >= 10
    prompt = tokenizer.encode("Text:")
    deltas, detok = stream(tokenizer, prompt, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE
    assert detok.output_text == MULTIBYTE
    assert sum(1 for d in deltas if d == "") >= 5, "incomplete characters must be held, not emitted"


def test_prompt_ending_mid_word_does_not_leak_into_the_output(tokenizer):
    text = "The function returns a value"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for cut in range(1, len(ids)):
        deltas, _ = stream(tokenizer, [0, *ids[:cut]], ids[cut:])
        assert tokenizer.decode(ids[:cut]) + "".join(deltas) == text


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\ufffd"),
        min_size=1,
        max_size=40,
    ),
    prefix=st.sampled_from(["", "Q: ", "日本", "😀"]),
)
def test_concatenated_deltas_equal_the_full_decode(tokenizer, text, prefix):
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode(prefix) if prefix else [0]
    deltas, _ = stream(tokenizer, prompt, ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_skipped_or_kept(tokenizer):
    im_start = tokenizer.token_id("<|im_start|>")
    ids = [*tokenizer.encode("ab", add_special_tokens=False), im_start, *tokenizer.encode("cd", False)]
    deltas, _ = stream(tokenizer, [0], ids)
    assert "".join(deltas) == "abcd"
    deltas, _ = stream(tokenizer, [0], ids, skip_special_tokens=False)
    assert "".join(deltas) == "ab<|im_start|>cd"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_is_cut_and_held_back(tokenizer, include):
    text = "first line. second STOP third"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, [0], SamplingParams(stop=["STOP"], include_stop_str_in_output=include)
    )
    emitted, found = "", None
    for tid in ids:
        found = detok.update([tid])
        emitted += detok.take_new_text(finished=found is not None)
        # Nothing shown so far may be cut later: it is always a prefix of the final text.
        assert "first line. second STOP"[: len(emitted)] == emitted
        assert "STO" not in emitted or include
        if found:
            break
    expected = "first line. second STOP" if include else "first line. second "
    assert found == "STOP" and detok.stop_reason == "STOP"
    assert emitted == detok.output_text == expected


def test_stop_string_spanning_tokens_is_found(tokenizer):
    # "lo" "wo" etc.: whatever the merges, the stop string straddles a token boundary somewhere
    text = "hello world and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop in ("o w", "lo wor", "d and m"):
        detok = IncrementalDetokenizer(tokenizer, [0], SamplingParams(stop=[stop]))
        for tid in ids:
            if detok.update([tid]):
                break
        assert detok.output_text == text[: text.index(stop)]


def test_no_stop_string_ends_a_request_before_min_tokens(tokenizer):
    text = "a. b. c. d. e. f. g."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 6
    detok = IncrementalDetokenizer(tokenizer, [0], SamplingParams(stop=["."], min_tokens=6))
    stopped_at = next(n for n, tid in enumerate(ids, 1) if detok.update([tid]))
    assert stopped_at > 6 and detok.stop_reason == "."  # the first "." after the sixth token, not the first
    assert detok.output_text.count(".") >= 2 and not detok.output_text.endswith(".")


# -- through the engine: output kinds -----------------------------------------------------------------------

PROMPT = "The quick brown fox"


def stream_engine(engine, rid, params):
    engine.add_request(rid, PROMPT, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def straddling_stop(engine) -> tuple[str, str]:
    """(full text, a 3-character stop string of printable ASCII that begins in one token's text and ends in
    the next one's), from a greedy run without stop strings: the case where holding back matters."""
    outs = stream_engine(engine, f"probe-{next(_ids)}", SamplingParams(max_tokens=30, ignore_eos=True))
    texts = [o.outputs[0].text for o in outs]
    full = texts[-1]
    for before in texts[2:]:
        b = len(before)
        s = full[b - 1 : b + 2]
        if len(s) == 3 and all(32 < ord(c) < 127 for c in s) and full.find(s) == b - 1:
            return full, s
    raise AssertionError(full)


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)


@pytest.mark.parametrize("with_stop", [False, True])
def test_delta_pieces_concatenate_to_the_final_text(engine, with_stop):
    full, stop_string = straddling_stop(engine)
    stop = [stop_string] if with_stop else []
    final = drain_one(engine, SamplingParams(max_tokens=30, ignore_eos=True, stop=stop)).outputs[0]
    if with_stop:
        assert final.finish_reason == "stop" and final.text == full[: full.index(stop_string)]

    deltas = stream_engine(
        engine,
        "delta",
        SamplingParams(max_tokens=30, ignore_eos=True, stop=stop, output_kind=OutputKind.DELTA),
    )
    assert deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    shown = ""
    for o in deltas:
        shown += o.outputs[0].text
        assert final.text.startswith(shown), "a streamed piece was later cut"
    assert shown == final.text
    assert [t for o in deltas for t in o.outputs[0].token_ids] == final.token_ids
    assert deltas[-1].outputs[0].finish_reason == final.finish_reason


def test_final_only_sends_one_output(engine):
    outs = stream_engine(engine, "f", SamplingParams(max_tokens=5, output_kind=OutputKind.FINAL_ONLY))
    assert len(outs) == 1 and outs[0].finished


def test_cumulative_outputs_grow_token_by_token(engine):
    outs = stream_engine(engine, "c", SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    for a, b in itertools.pairwise(outs):
        assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids


def test_cumulative_text_never_shows_what_a_stop_string_cuts(engine):
    _, stop = straddling_stop(engine)
    outs = stream_engine(engine, "c", SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))
    final = outs[-1].outputs[0].text
    for o in outs:
        assert final.startswith(o.outputs[0].text)


_ids = iter(range(10**6))


def drain_one(engine, params):
    rid = f"one-{next(_ids)}"
    engine.add_request(rid, PROMPT, params)
    return drain(engine)[rid]
