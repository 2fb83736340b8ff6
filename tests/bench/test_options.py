"""Options of ``tokenmill bench run`` that go together, and those that would be silently ignored."""

from __future__ import annotations

import pytest

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.options import LoadOptions, check_run_options


def load(**given) -> LoadOptions:
    fields = dict(
        profile=None,
        concurrency=None,
        rate=None,
        burstiness=None,
        max_concurrency=None,
        search=False,
        trace=False,
    )
    return LoadOptions(**{**fields, **given})


def test_a_search_keeps_the_profile_asked_for():
    # --find-max-goodput --profile gamma --burstiness 0.3 used to run Poisson anyway.
    assert load(search=True, profile="gamma", burstiness=0.3, rate="2", max_concurrency=4).profiles() == [
        LoadProfile("gamma", rate=2.0, burstiness=0.3, max_concurrency=4)
    ]
    assert load(search=True, profile="constant").profiles() == [LoadProfile("constant", rate=1.0)]
    assert load(search=True).profiles() == [LoadProfile("poisson", rate=1.0)]  # the default


def test_defaults_pick_the_profile_from_the_other_options():
    assert load().profiles() == [LoadProfile("concurrency", concurrency=8)]
    assert load(trace=True).profiles() == [LoadProfile("trace")]
    assert [p.rate for p in load(profile="poisson", rate="1,2").profiles()] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"search": True, "profile": "concurrency"}, "--profile concurrency has none"),
        ({"search": True, "profile": "trace", "trace": True}, "the trace gives the times"),
        ({"search": True, "profile": "poisson", "burstiness": 0.3}, "--burstiness goes with --profile gamma"),
        ({"search": True, "concurrency": "4"}, "drop --concurrency"),
        ({"profile": "trace"}, "--profile trace needs --trace FILE"),
        ({"rate": "3"}, "--rate goes with --profile constant"),
        ({"profile": "gamma", "rate": "2", "burstiness": 0.0}, "--burstiness must be a finite number > 0"),
        ({"profile": "poisson"}, "--profile poisson needs --rate"),
        ({"profile": "poisson", "rate": "inf"}, "--rate values must be finite numbers > 0"),
        ({"profile": "constant", "rate": "1e400"}, "--rate values must be finite numbers > 0"),
        ({"concurrency": "1,,2"}, "--concurrency must be an integer or a comma-separated list of them"),
        (
            {"concurrency": "2.5"},
            "--concurrency must be an integer or a comma-separated list",
        ),  # not "a number"
        ({"search": True, "rate": "1,2"}, "--find-max-goodput starts from one --rate, got '1,2'"),
    ],
)
def test_load_options_that_would_be_ignored_are_refused(given, message):
    with pytest.raises(ValueError, match=message):
        load(**given).profiles()


FINE = dict(
    search=False, goodput_target=None, slo=None, gpus=None, gpu_cost_per_hour=None, duration=None,
    stream=True, continuous_usage=False, data="synthetic", turns=None, think_time=None, check_tokens=100,
)  # fmt: skip


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"gpus": 2}, "--gpus goes with --gpu-cost-per-hour"),
        ({"duration": -1.0}, r"--duration must be a number of seconds > 0, got -1"),
        ({"duration": 0.0}, r"--duration must be a number of seconds > 0, got 0"),
        ({"goodput_target": 0.5}, "--goodput-target goes with --find-max-goodput"),
        ({"search": True, "slo": "ttft=1", "goodput_target": 1.5}, r"fraction in \(0, 1\], got 1.5"),
        ({"search": True}, "--find-max-goodput needs --slo"),
        ({"gpu_cost_per_hour": 0.0}, "--gpu-cost-per-hour must be a finite number > 0"),
        ({"gpu_cost_per_hour": float("inf")}, "--gpu-cost-per-hour must be a finite number > 0, got inf"),
        ({"data": "multi-turn", "turns": 0}, "--turns must be >= 1, got 0"),
        ({"data": "multi-turn", "think_time": float("nan")}, "--think-time must be a finite number"),
        ({"max_lag_p99": -1.0}, "--max-lag-p99 must be a finite number of seconds > 0, got -1"),
        ({"max_lag_p99": float("nan")}, "--max-lag-p99 must be a finite number of seconds > 0, got nan"),
        ({"read_timeout": 0.0}, "--read-timeout must be a finite number of seconds > 0, got 0"),
        ({"read_timeout": float("nan")}, "--read-timeout must be a finite number of seconds > 0, got nan"),
        ({"stream": False, "slo": "ttft=1,tpot=0.05"}, "--slo tpot needs the tokens' times.*--no-stream"),
        ({"stream": False, "slo": "itl=0.1"}, "--slo itl needs"),
        ({"stream": False, "continuous_usage": True}, "needs --stream"),
        ({"turns": 2}, "--turns and --think-time go with --data multi-turn"),
        ({"check_tokens": -1}, "--check-tokens must be >= 0"),
        ({"temperature": -0.5}, r"--temperature must be a number >= 0 \(0: greedy\), got -0.5"),
        ({"temperature": float("nan")}, "--temperature must be a number >= 0"),
    ],
)
def test_other_options_name_what_they_need(given, message):
    with pytest.raises(ValueError, match=message):
        check_run_options(**{**FINE, **given})
    check_run_options(**FINE)  # and the defaults pass
