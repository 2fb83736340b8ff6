"""build_request: chat messages reach the wire as HTTP chat reads them, or are refused before sending."""

from __future__ import annotations

import pytest

from tokenmill.client.grpc_messages import build_request
from tokenmill.protocol.errors import APIError


def wire_messages(messages) -> list[tuple[str, str]]:
    request = build_request(messages, None, None, {})
    return [(m.role, m.content) for m in request.chat.messages]


def test_text_parts_are_joined_as_http_chat_joins_them():
    """Not the list's repr: the model saw "[{'type': 'text', 'text': 'Hi'}]" (37 prompt tokens, not 14)."""
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]
    assert wire_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    ) == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert wire_messages([{"role": "user", "content": ({"type": "text", "text": "a", "extra": 1},)}]) == [
        ("user", "a")
    ]


def test_an_assistant_message_may_come_without_content():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]
    assert wire_messages(messages) == [("user", "Hi"), ("assistant", "")]
    assert wire_messages([{"role": "user", "content": "Hi"}, {"role": "assistant"}])[1] == ("assistant", "")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "required for a user message"),
        ("<missing>", "required for a user message"),
        ([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}], "'image_url'"),
        ([{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}], "[1] is invalid"),
        ([{"type": "text"}], "[0].text is invalid: allowed a string, got NoneType"),
        ([{"type": "text", "text": 5}], "got int"),
        (["Hi"], "'str'"),
        (5, "got int"),
        ({"type": "text", "text": "Hi"}, "got dict"),
    ],
)
def test_other_content_is_a_400_naming_the_message_before_sending(content, words):
    second = {"role": "user"} if content == "<missing>" else {"role": "user", "content": content}
    with pytest.raises(APIError) as info:
        build_request([{"role": "system", "content": "Be brief."}, second], None, None, {})
    assert (info.value.status, info.value.param) == (400, "messages[1].content")
    assert info.value.message.startswith("messages[1].content") and words in info.value.message


def test_a_message_without_a_role_is_named():
    with pytest.raises(APIError) as info:
        build_request([{"role": "user", "content": "Hi"}, {"content": "x"}], None, None, {})
    assert (info.value.status, info.value.param) == (400, "messages[1].role")
