"""``--kv-cache-memory`` as users write it: bytes with or without a unit, or a fraction."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from tokenmill.cli.engine_options import parse_kv_cache_memory


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.5", 0.5),
        ("1", 1.0),  # a fraction: all the free memory, as before
        ("2147483648", 2**31),
        ("2e9", 2 * 10**9),
        ("4GiB", 4 * 2**30),
        ("512mb", 512 * 10**6),
        ("1.5 GiB", 3 * 2**29),
        (None, None),
    ],
)
def test_sizes_and_fractions(text, value):
    parsed = parse_kv_cache_memory(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["2.5", "0", "-1", "abc", "3XB", "0.5b", ""])
def test_what_is_neither_is_refused_saying_what_is_allowed(text):
    with pytest.raises(typer.BadParameter, match=r"a fraction in \(0, 1\] of the free memory, or bytes"):
        parse_kv_cache_memory(text)


def test_the_cli_refuses_a_fractional_byte_count_before_loading_anything():
    """2.5 was read as 2 bytes, and the error that followed no longer showed the number typed."""
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "generate", "Hi", "--kv-cache-memory", "2.5"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""}
    )
    assert done.returncode == 2 and "'2.5' is not a fraction" in done.stderr
