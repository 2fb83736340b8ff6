"""The SSE decoder: the WHATWG event-stream rules, however the bytes are split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.client.sse import SSEDecoder, SSEEvent


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = []
    for i, chunk in enumerate(chunks):
        events += decoder.feed(chunk, float(i))
    return events


def test_openai_stream_gives_one_event_per_data_line_pair():
    events = decode(b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == ['{"a":1}', '{"a":2}', "[DONE]"]
    assert all(e.event == "message" for e in events)


def test_an_event_is_stamped_with_the_arrival_of_its_last_bytes():
    events = decode(b"data: first\n", b"\n", b"data: sec", b"ond\n\ndata: third\n\n")
    assert [(e.data, e.time) for e in events] == [("first", 1.0), ("second", 3.0), ("third", 3.0)]


def test_multi_line_data_is_joined_with_newlines_and_one_leading_space_is_dropped():
    (event,) = decode(b"data:  two spaces\ndata:none\ndata\n\n")
    assert event.data == " two spaces\nnone\n"


def test_fields_comments_and_line_ends():
    stream = b": keep-alive\r\nevent: error\r\nid: 7\r\ndata: x\r\n\r\nretry: 10\rdata: y\r\r"
    events = decode(stream)
    assert [(e.event, e.id, e.data) for e in events] == [("error", "7", "x"), ("message", "7", "y")]


def test_a_crlf_split_between_chunks_is_one_line_end():
    assert [e.data for e in decode(b"data: a\r", b"\n\r", b"\n")] == ["a"]


def test_blank_lines_without_data_dispatch_nothing_and_reset_the_event_type():
    events = decode(b"\n\nevent: ping\n\ndata: after\n\n")
    assert [(e.event, e.data) for e in events] == [("message", "after")]


def test_an_unfinished_event_is_reported_as_partial():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: cut", 0.0) == []
    assert decoder.has_partial_event
    decoder = SSEDecoder()
    decoder.feed(b"data: whole\n\n", 0.0)
    assert not decoder.has_partial_event


def test_invalid_utf8_is_replaced_not_raised():
    (event,) = decode(b"data: \xff\xfe\n\n")
    assert event.data == "\ufffd\ufffd"


_lines = st.lists(
    st.one_of(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12
        ).map(lambda t: f"data: {t}"),
        st.sampled_from(["", ": comment", "event: delta", "id: 3", "data"]),
    ),
    max_size=30,
)


@given(lines=_lines, ending=st.sampled_from(["\n", "\r\n", "\r"]), cuts=st.lists(st.integers(0, 400)))
def test_any_split_of_the_bytes_gives_the_same_events(lines, ending, cuts):
    raw = "".join(line + ending for line in lines).encode()
    whole = [(e.data, e.event, e.id) for e in decode(raw)]
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert [(e.data, e.event, e.id) for e in decode(*pieces)] == whole
