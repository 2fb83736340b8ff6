"""Load profiles: the schedules have the rate and dispersion they claim, and are reproducible."""

from __future__ import annotations

import itertools
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.bench.load import LoadProfile, intended_times, read_trace


def gaps(times):
    return [b - a for a, b in itertools.pairwise(times)]


def test_constant_rate_is_exact():
    assert intended_times(LoadProfile("constant", rate=4.0), 5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_poisson_gaps_have_the_mean_and_the_dispersion_of_an_exponential():
    g = gaps(intended_times(LoadProfile("poisson", rate=50.0), 20_001, seed=1))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.02, rel=0.03)
    assert statistics.pstdev(g) / mean == pytest.approx(1.0, abs=0.04)  # coefficient of variation 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_gaps_keep_the_rate_and_spread_as_one_over_root_burstiness(burstiness):
    g = gaps(intended_times(LoadProfile("gamma", rate=10.0, burstiness=burstiness), 20_001, seed=2))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(g) / mean == pytest.approx(burstiness**-0.5, rel=0.08)


@given(seed=st.integers(0, 2**32), n=st.integers(1, 200), rate=st.floats(0.1, 1e4))
def test_schedules_are_seeded_sorted_and_start_at_zero(seed, n, rate):
    profile = LoadProfile("poisson", rate=rate)
    times = intended_times(profile, n, seed)
    assert times == intended_times(profile, n, seed)
    assert times[0] == 0.0 and times == sorted(times) and len(times) == n


def test_a_trace_gives_its_own_times_from_zero(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 12.5, "input_tokens": 7}\n\n{"timestamp": 10.0, "output_tokens": 3}\n')
    rows = read_trace(str(path))
    assert rows == [{"timestamp": 10.0, "output_tokens": 3}, {"timestamp": 12.5, "input_tokens": 7}]
    times = intended_times(LoadProfile("trace"), 2, trace=[r["timestamp"] for r in rows])
    assert times == [0.0, 2.5]


def test_a_bad_trace_line_is_named(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 1}\n{"time": 2}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:2: .*timestamp"):
        read_trace(str(path))


@pytest.mark.parametrize("stamp", ["NaN", "Infinity", '"nan"', "true"])
def test_a_trace_time_that_is_no_finite_number_is_refused(tmp_path, stamp):
    # A NaN time made every latency NaN and wrote "intended": NaN (not JSON) into the event log.
    path = tmp_path / "trace.jsonl"
    path.write_text(f'{{"timestamp": 0}}\n{{"timestamp": {stamp}}}\n{{"timestamp": 0.2}}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:2: \"timestamp\" must be a finite number"):
        read_trace(str(path))


def test_a_trace_that_is_no_text_or_a_folder_is_named(tmp_path):
    binary = tmp_path / "trace.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"trace\.bin is not UTF-8 text"):
        read_trace(str(binary))
    with pytest.raises(ValueError, match="is a folder"):
        read_trace(str(tmp_path))


def test_a_bool_length_in_a_trace_is_refused(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 0, "output_tokens": true}\n')
    with pytest.raises(ValueError, match="output_tokens must be an integer >= 1, got True"):
        read_trace(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "burst"}, "profile must be one of"),
        ({"kind": "poisson"}, "rate"),
        ({"kind": "constant", "rate": 0.0}, "rate"),
        ({"kind": "concurrency", "concurrency": 0}, "concurrency"),
        ({"kind": "gamma", "rate": 1.0, "burstiness": 0.0}, "burstiness"),
        ({"kind": "constant", "rate": float("inf")}, "rate"),
        ({"kind": "poisson", "rate": 1.0, "max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_profiles_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadProfile(**kwargs)
