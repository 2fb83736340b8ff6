"""The adaptive concurrency limit: slow start, backoff on TTFT and overload, headroom and re-probes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.client.conftest import FakeClock
from tokenmill.client.adaptive import AdaptiveLimit, LimitSettings


def window(limit: AdaptiveLimit, ttft: float) -> None:
    """One saturated window of first tokens, all at ``ttft``."""
    limit.note_in_flight(limit.limit)
    for _ in range(max(limit.settings.min_window, limit.limit)):
        limit.on_latency(ttft)


def test_slow_start_doubles_until_congestion_then_backs_off_and_grows_by_one():
    limit = AdaptiveLimit(LimitSettings(initial=4))
    for expected in (8, 16, 32):
        window(limit, 0.010)
        assert limit.limit == expected
    window(limit, 0.050)  # 5x the baseline: congestion
    assert limit.limit == 25  # 32 * 0.8
    assert limit.congestions == 1
    window(limit, 0.010)
    assert limit.limit == 26  # past slow start: one more per good window


def test_a_window_that_never_reached_the_limit_does_not_grow_it():
    limit = AdaptiveLimit(LimitSettings(initial=4))
    for _ in range(4):
        limit.on_latency(0.010)  # in flight never reached 4: no evidence more would help
    assert limit.limit == 4


def test_overload_halves_at_once_but_only_once_per_window():
    limit = AdaptiveLimit(LimitSettings(initial=32))
    limit.on_overload()
    limit.on_overload()
    assert limit.limit == 16
    window(limit, 0.010)  # the window closes; the next overload counts again
    limit.on_overload()
    assert limit.limit == 8


def test_latency_mode_holds_its_headroom_between_probes_and_reprobes():
    clock = FakeClock()
    limit = AdaptiveLimit(LimitSettings(initial=4, headroom=0.5, reprobe_s=30.0), clock=clock)
    window(limit, 0.010)
    window(limit, 0.010)
    window(limit, 0.100)  # congestion at 16: the knee is 12.8
    assert limit.knee == 16 * 0.8
    assert limit.limit == 6  # half the knee
    for _ in range(5):
        window(limit, 0.010)
    assert limit.limit == 6  # held: no growth between probes
    clock.now = 31.0
    window(limit, 0.010)  # a probe starts: the full limit for a while
    assert limit.limit >= 12
    clock.now = 40.0
    window(limit, 0.010)
    assert limit.limit == int(limit.knee * 0.5)


@given(
    st.lists(st.one_of(st.floats(0.001, 1.0), st.just(-1.0)), max_size=300),
    st.integers(1, 8),
    st.integers(8, 64),
)
def test_the_limit_stays_within_its_bounds(events, low, high):
    limit = AdaptiveLimit(LimitSettings(initial=low, min=low, max=high))
    for e in events:
        limit.note_in_flight(limit.limit)
        if e < 0:
            limit.on_overload()
        else:
            limit.on_latency(e)
        assert low <= limit.limit <= high


def test_bad_settings_name_the_field():
    import pytest

    with pytest.raises(ValueError, match="headroom"):
        LimitSettings(headroom=0)
    with pytest.raises(ValueError, match="tolerance"):
        LimitSettings(tolerance=1.0)
