"""Values quoted back in error messages as the client wrote them (JSON), cut visibly."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.protocol.shown import shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "true"),
        (None, "null"),
        ("60", '"60"'),
        ([1, "a"], '[1, "a"]'),
        ({"k": False}, '{"k": false}'),
        (float("nan"), "NaN"),
        ("é", '"é"'),
        (datetime.date(2026, 1, 2), '"2026-01-02"'),  # (a YAML date)
    ],
)
def test_a_value_is_spelt_as_json_spells_it(value, expected):
    assert shown(value) == expected


def test_a_long_value_is_cut_with_an_ellipsis_never_quoted_as_if_whole():
    digits = int("9" * 50)  # the QA case: it was quoted as 40 nines
    assert shown(digits, 40) == "9" * 39 + "…" and len(shown("x" * 500)) == 60


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists, max_leaves=8))
def test_never_longer_than_the_limit(value):
    assert len(shown(value, 30)) <= 30
