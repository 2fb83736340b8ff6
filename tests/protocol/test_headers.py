"""How tokenmill's headers parse."""

from __future__ import annotations

import pytest

from tokenmill.protocol import APIError, parse_priority
from tokenmill.protocol.headers import PRIORITY_MAX, PRIORITY_MIN


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("7", 7), (" -3 ", -3), ("+2", 2), (str(PRIORITY_MAX), PRIORITY_MAX),
     (str(PRIORITY_MIN), PRIORITY_MIN)],
)  # fmt: skip
def test_priorities_that_parse(value, expected):
    assert parse_priority(value) == expected


@pytest.mark.parametrize(
    "value", ["1_0", "high", "1.5", "٣", "--1", str(PRIORITY_MAX + 1), "9" * 30, "9" * 5000, "+"]
)
def test_anything_else_is_a_400_naming_the_header_and_the_range(value):
    with pytest.raises(APIError) as e:
        parse_priority(value)
    assert e.value.status == 400 and e.value.param == "x-tokenmill-priority"
    assert str(PRIORITY_MIN) in e.value.message and str(PRIORITY_MAX) in e.value.message
