"""Usage read from responses on their way through the gateway; the usage chunk kept or dropped."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router.usage_meter import UsageMeter, ask_for_usage, last_member_usage

CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "he"}}]},
    {"choices": [{"index": 0, "delta": {"content": "llo"}}]},
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}},
]
STREAM = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in CHUNKS) + b"data: [DONE]\n\n"


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if a < b]


@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_a_client_that_did_not_ask_gets_the_stream_without_the_usage_chunk(cuts):
    meter = UsageMeter(sse=True, client_wants_usage=False)
    out = b"".join(meter.feed(p) for p in pieces(STREAM, cuts))
    meter.finish()
    assert out == STREAM.replace(f"data: {json.dumps(CHUNKS[2])}\n\n".encode(), b"")
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens, meter.usage.seen) == (12, 2, True)
    assert meter.events == 2


@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_a_client_that_asked_gets_every_byte_as_it_came(cuts):
    meter = UsageMeter(sse=True, client_wants_usage=True)
    parts = pieces(STREAM, cuts)
    assert [meter.feed(p) for p in parts] == parts
    assert meter.usage.completion_tokens == 2 and meter.usage.seen
    assert meter.events == 2  # the completion estimate, were usage missing


@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_continuous_usage_ends_with_the_last_chunks_figures(cuts):
    chunks = [
        {
            "choices": [{"index": 0, "delta": {"content": "a"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": i},
        }
        for i in range(1, 4)
    ]
    stream = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    for asked in (True, False):
        meter = UsageMeter(sse=True, client_wants_usage=asked)
        out = b"".join(meter.feed(p) for p in pieces(stream, cuts))
        assert out == stream  # no usage-only chunk: nothing dropped either way
        assert (meter.usage.prompt_tokens, meter.usage.completion_tokens, meter.usage.seen) == (5, 3, True)


def test_whole_responses_and_requests():
    meter = UsageMeter(sse=False, client_wants_usage=True)
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert meter.feed(body[:5]) + meter.feed(body[5:]) == body
    meter.finish()
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (3, 4)
    assert last_member_usage(body) == {"prompt_tokens": 3, "completion_tokens": 4}  # read from the end
    request = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(request) is False
    assert request["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert ask_for_usage({"stream": True, "stream_options": {"include_usage": True}}) is True
    assert ask_for_usage({"stream": False}) is True


_KEYS = st.sampled_from(["usage", "choices", '"usage": 1}', "x"]) | st.text(max_size=4)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='usage"{}:, \\é', max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(_KEYS, _VALUES, max_size=4), _VALUES, st.booleans(), st.sampled_from([None, 2]))
def test_usage_read_from_the_body_s_end_is_always_the_top_level_one(obj, usage, last, indent):
    """The shortcut that skips parsing the choices finds the top-level usage when it is the last
    member, and nothing else: never a nested one, nor one inside a string."""
    if last:
        obj = {**{k: v for k, v in obj.items() if k != "usage"}, "usage": usage}
    body = json.dumps(obj, indent=indent, ensure_ascii=indent is None).encode()
    found = last_member_usage(body)
    if found is not None:
        assert "usage" in obj and list(obj)[-1] == "usage" and found == obj["usage"]
    meter, parsed = (
        UsageMeter(sse=False, client_wants_usage=True),
        UsageMeter(sse=False, client_wants_usage=True),
    )
    meter.feed(body)
    meter.finish()  # the shortcut, or the whole body parsed
    parsed._take(obj.get("usage"))  # what parsing it all gives
    assert meter.usage == parsed.usage


def test_what_servers_may_send_otherwise():
    """``data:`` without its space and CR line ends (both SSE), and usage figures nobody can have."""
    bare = STREAM.replace(b"data: ", b"data:")
    meter = UsageMeter(sse=True, client_wants_usage=True)
    assert b"".join(meter.feed(p) for p in pieces(bare, [7, 40, 41])) == bare
    assert (meter.usage.completion_tokens, meter.events) == (2, 2)
    crlf = STREAM.replace(b"\n", b"\r\n")
    meter = UsageMeter(sse=True, client_wants_usage=True)
    assert b"".join(meter.feed(p) for p in pieces(crlf, [30, 61])) == crlf
    assert meter.usage.completion_tokens == 2 and meter.usage.seen
    huge = json.dumps({"choices": [], "usage": {"prompt_tokens": 2**70, "completion_tokens": 1}})
    meter = UsageMeter(sse=True, client_wants_usage=True)
    meter.feed(f"data: {huge}\n\n".encode())
    assert not meter.usage.seen  # not believed: the router's estimate stands
