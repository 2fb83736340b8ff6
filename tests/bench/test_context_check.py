"""``tokenmill bench run`` refuses lengths the model's context cannot hold before building any
prompt: the server would refuse every such request (a max_tokens past the context is a 400), and
a prompt of a million tokens took minutes and gigabytes to build first."""

from __future__ import annotations

import pytest

from tests.bench.test_cli import bench
from tests.server.conftest import start_server
from tokenmill.bench.data import Length
from tokenmill.bench.specs import DataSource


def source(kind: str = "synthetic", prompt: str = "100", output: str = "20", **kw) -> DataSource:
    return DataSource(kind, Length.parse(prompt, "p"), Length.parse(output, "o"), **kw)


@pytest.mark.parametrize(
    ("made", "limit", "says"),
    [
        (source(prompt="1000", output="25"), 1024, "--prompt-tokens 1000 + --output-tokens 25 (up to 1025"),
        (
            source(prompt="500:1000", output="25"),
            1024,
            "(up to 1025 tokens) is past the model's context of 1024",
        ),
        (
            source("shared-prefix", prefix_tokens=Length(900, 900)),
            1000,
            "--prefix-tokens 900 + --prompt-tokens",
        ),
        (source("multi-turn", turns=9), 1000, "9 turns of --prompt-tokens 100"),
        (
            source(trace=[{"input_tokens": 10}, {"input_tokens": 2000}]),
            1024,
            "the trace's longest request, 2020",
        ),
    ],
)
def test_what_cannot_fit_is_refused_naming_the_options(made, limit, says):
    with pytest.raises(ValueError, match="past the model's context") as e:
        made.check_context(limit)
    assert says in str(e.value)


def test_what_fits_or_is_not_known_passes():
    source(prompt="1000", output="24").check_context(1024)
    source(prompt="100000000").check_context(None)
    source("multi-turn", turns=8).check_context(1000)


def test_the_cli_exits_2_before_building_a_prompt():
    worker = start_server("--grpc-port", "-1")
    try:
        done = bench(
            "run", worker.url, "--prompt-tokens", "100000000", "--output-tokens", "8", "--requests", "2"
        )
    finally:
        worker.stop()
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert (
        "--prompt-tokens 100000000 + --output-tokens 8 (up to 100000008 tokens) is past the model's "
        "context of 1024" in said
    )
