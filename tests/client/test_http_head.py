"""Request head lines: what cannot go in an HTTP/1.1 header is refused naming the field, and a
credential that cannot is never echoed (error messages end up in logs)."""

from __future__ import annotations

import pytest

from tokenmill.client.http_head import head_line, head_lines


def test_a_good_field_is_one_line():
    assert head_line("x-tenant", "team-a") == "x-tenant: team-a\r\n"
    assert head_lines({"a": "1", "b": "2"}) == "a: 1\r\nb: 2\r\n"


@pytest.mark.parametrize("name", ["authorization", "Authorization", "x-api-key", "cookie"])
def test_a_bad_credential_is_refused_without_showing_it(name):
    with pytest.raises(ValueError, match=f"header '{name}' must be a one-line latin-1 string") as e:
        head_line(name, "Bearer sk-secret-123\nx-injected: 1")
    assert "sk-secret" not in str(e.value) and "(not shown)" in str(e.value)


def test_other_bad_values_are_shown_to_help():
    with pytest.raises(ValueError, match="got 'caf\u20ac'"):
        head_line("x-tenant", "caf\u20ac")
    with pytest.raises(ValueError, match="header name 'bad name' is not a valid HTTP field name"):
        head_line("bad name", "x")
