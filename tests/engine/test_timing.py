"""Timing model: fitting, profiles on disk, step shapes, prefill chunk sizing under max_itl, online refits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import InvalidRequestError, SamplingParams
from tokenmill.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.engine.timing import (
    DEFAULT_PROFILE,
    ChunkSizer,
    OnlineTimingModel,
    StepShape,
    TimingModel,
)

COEFFS = ("overhead_s", "per_token_s", "per_decode_s", "per_context_token_s", "per_attention_pair_s")

TRUE = TimingModel(
    overhead_s=2e-3,
    per_token_s=4e-5,
    per_decode_s=2e-5,
    per_context_token_s=1e-6,
    per_attention_pair_s=2e-8,
)


def random_shapes(n: int, seed: int = 0, prefill: bool = True, decode: bool = True) -> list[StepShape]:
    """Steps of every kind a server sees: prefill only, decode only and mixed, with varied contexts."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        kind = rng.choice([k for k, on in (("prefill", prefill), ("decode", decode), ("mixed", True)) if on])
        p = rng.randint(1, 1024) if kind != "decode" else 0
        d = rng.randint(1, 64) if kind != "prefill" else 0
        ctx = d * rng.randint(1, 512)
        start = rng.randint(0, 512)
        shapes.append(StepShape(p, d, ctx, p * (start + (p + 1) / 2)))
    return shapes


def coefficients(model: TimingModel) -> np.ndarray:
    return np.array([getattr(model, c) for c in COEFFS])


# -- fitting -----------------------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients_from_noisy_steps():
    shapes = random_shapes(400)
    rng = np.random.default_rng(1)
    seconds = [TRUE.step_time(s) * (1 + rng.normal(0, 0.005)) for s in shapes]
    fit = TimingModel.fitted(shapes, seconds, model="synthetic", kv_cache_tokens=4096)
    assert coefficients(fit) == pytest.approx(coefficients(TRUE), rel=0.05)
    assert fit.fit["samples"] == 400
    assert 0 <= fit.fit["median_relative_error"] <= fit.fit["p90_relative_error"] < 0.02
    assert (fit.model, fit.kv_cache_tokens) == ("synthetic", 4096)


def test_fit_is_exact_on_noiseless_steps():
    shapes = random_shapes(60, seed=2)
    fit = TimingModel.fitted(shapes, [TRUE.step_time(s) for s in shapes])
    assert coefficients(fit) == pytest.approx(coefficients(TRUE), rel=1e-6)
    assert fit.fit["median_relative_error"] < 1e-9


def test_fit_never_returns_a_negative_coefficient():
    """Steps that get cheaper with each decode: plain least squares gives per_decode_s < 0, the fit must
    clamp it to 0 and refit the others."""
    shapes = random_shapes(200, seed=3)
    seconds = [1e-3 + 5e-5 * (s.num_prefill_tokens + s.num_decodes) - 3e-5 * s.num_decodes for s in shapes]
    x = np.array([s.features() for s in shapes])
    unconstrained, *_ = np.linalg.lstsq(x, np.array(seconds), rcond=None)
    assert unconstrained.min() < -1e-6, "the data must push a coefficient below zero"

    fit = TimingModel.fitted(shapes, seconds)
    coef = coefficients(fit)
    assert (coef >= 0).all(), dict(zip(COEFFS, coef, strict=True))
    assert fit.per_decode_s == 0.0
    assert fit.overhead_s > 0 and fit.per_token_s > 0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=5, max_size=5),
)
def test_fit_coefficients_are_nonnegative_whatever_the_data(seed, signs):
    shapes = random_shapes(40, seed=seed)
    true = coefficients(TRUE) * np.array(signs)
    seconds = [abs(float(true @ np.array(s.features()))) + 1e-4 for s in shapes]
    assert (coefficients(TimingModel.fitted(shapes, seconds)) >= 0).all()


# -- profiles on disk ----------------------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field(tmp_path):
    shapes = random_shapes(30, seed=4)
    model = TimingModel.fitted(
        shapes,
        [TRUE.step_time(s) for s in shapes],
        model="m",
        device="cpu",
        dtype="float32",
        kv_cache_tokens=77,
    )
    text = model.to_json()
    assert TimingModel.from_json(text) == model
    path = tmp_path / "p.json"
    path.write_text(text)
    assert TimingModel.load(path) == model
    assert TimingModel.load(str(path)) == model


def test_from_json_ignores_unknown_fields():
    raw = json.loads(TRUE.to_json())
    raw["written_by"] = "a newer tokenmill"
    assert TimingModel.from_json(json.dumps(raw)) == TRUE


def test_default_profile_ships_and_loads():
    assert DEFAULT_PROFILE.is_file()
    model = TimingModel.load()
    assert model == TimingModel.load(DEFAULT_PROFILE)
    assert model.overhead_s > 0
    assert (coefficients(model) >= 0).all()
    assert model.kv_cache_tokens and model.kv_cache_tokens > 0
    assert model.fit["samples"] > 0


# -- step shapes ---------------------------------------------------------------------------------------------


def new(rid: str, num_tokens: int, computed: int) -> NewRequestData:
    return NewRequestData(rid, list(range(num_tokens)), num_tokens, SamplingParams(), [], computed)


def test_step_shape_counts_prefills_decodes_and_context():
    sched = SchedulerOutput(
        new_requests=[new("fresh", 10, 0), new("hit", 20, 16), new("one", 1, 0)],
        cached_requests=[
            CachedRequestData("dec", [], 20),
            CachedRequestData("chunk", [], 32),
            CachedRequestData("dec2", [], 7),
        ],
        num_scheduled_tokens={"fresh": 10, "hit": 4, "one": 1, "dec": 1, "chunk": 8, "dec2": 1},
    )
    shape = StepShape.of(sched)
    assert shape.num_prefill_tokens == 10 + 4 + 1 + 8
    assert shape.num_decodes == 2
    assert shape.decode_context_tokens == (20 + 1) + (7 + 1)
    # Each prefill chunk of n tokens starting at s attends to n * (s + (n + 1) / 2) keys.
    assert shape.prefill_attention_pairs == pytest.approx(10 * 5.5 + 4 * (16 + 2.5) + 1 * 1 + 8 * (32 + 4.5))
    assert shape.features() == [1.0, 25.0, 2.0, 29.0, shape.prefill_attention_pairs]


def test_step_shape_of_an_empty_step_is_zero():
    assert StepShape.of(SchedulerOutput()) == StepShape()
    assert TRUE.step_time(StepShape()) == TRUE.overhead_s


def test_step_time_is_the_linear_model():
    shape = StepShape(100, 4, 400, 5050.0)
    expected = 2e-3 + 4e-5 * 104 + 2e-5 * 4 + 1e-6 * 400 + 2e-8 * 5050
    assert TRUE.step_time(shape) == pytest.approx(expected, rel=1e-12)


# -- chunk sizing --------------------------------------------------------------------------------------------


def chunk_shape(n: int, decodes: int, ctx: int, prefill_ctx: int) -> StepShape:
    return StepShape(n, decodes, ctx, n * (prefill_ctx + (n + 1) / 2))


def test_no_decodes_means_the_whole_limit():
    sizer = ChunkSizer(TRUE, max_itl=1e-9, min_chunk=16)
    assert sizer.max_chunk(StepShape(0, 0, 0), 0, 2048) == 2048


def test_chunk_is_the_largest_that_keeps_max_itl():
    sizer = ChunkSizer(TRUE, max_itl=0.01, min_chunk=16)
    n = sizer.max_chunk(StepShape(0, 8, 800), 100, 2048)
    assert 16 < n < 2048
    assert TRUE.step_time(chunk_shape(n, 8, 800, 100)) <= 0.01
    assert TRUE.step_time(chunk_shape(n + 1, 8, 800, 100)) > 0.01


def test_min_chunk_floor_when_decodes_alone_exceed_max_itl():
    sizer = ChunkSizer(TRUE, max_itl=1e-3, min_chunk=16)  # the overhead alone is 2 ms
    assert sizer.max_chunk(StepShape(0, 8, 800), 0, 2048) == 16
    assert sizer.max_chunk(StepShape(0, 8, 800), 0, 5) == 5  # but never past the limit


def test_prefill_already_in_the_step_counts_and_gets_no_floor():
    """A second prompt in the same step gets what the first left; once prefill tokens are in
    the step, no minimum chunk is forced on top of them."""
    sizer = ChunkSizer(TRUE, max_itl=0.01, min_chunk=16)
    first = sizer.max_chunk(StepShape(0, 8, 800), 0, 2048)
    committed = StepShape(0, 8, 800) + StepShape.of_request(first, 0)
    assert sizer.max_chunk(committed, 0, 2048) == 0
    half = StepShape(0, 8, 800) + StepShape.of_request(first // 2, 0)
    second = sizer.max_chunk(half, 0, 2048)
    assert 0 < second < first
    assert TRUE.step_time(half + StepShape.of_request(second, 0)) <= 0.01


def test_generous_max_itl_gives_the_limit():
    sizer = ChunkSizer(TRUE, max_itl=10.0, min_chunk=16)
    assert sizer.max_chunk(StepShape(0, 8, 800), 0, 512) == 512


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    coef=st.tuples(*[st.floats(0, 1e-3)] * 2, *[st.floats(0, 1e-5)] * 2, st.floats(0, 1e-7)),
    max_itl=st.floats(1e-4, 0.2),
    decodes=st.integers(1, 64),
    ctx_per_decode=st.integers(1, 1000),
    prefill_ctx=st.integers(0, 1000),
    limit=st.integers(1, 600),
    min_chunk=st.sampled_from([8, 16, 64]),
)
def test_chunk_matches_a_linear_search(coef, max_itl, decodes, ctx_per_decode, prefill_ctx, limit, min_chunk):
    model = TimingModel(**dict(zip(COEFFS, coef, strict=True)))
    sizer = ChunkSizer(model, max_itl, min_chunk)
    ctx = decodes * ctx_per_decode
    fitting = [
        n for n in range(limit + 1) if model.step_time(chunk_shape(n, decodes, ctx, prefill_ctx)) <= max_itl
    ]
    best = max(fitting, default=0)
    assert sizer.max_chunk(StepShape(0, decodes, ctx), prefill_ctx, limit) == min(limit, max(best, min_chunk))


# -- online refits -------------------------------------------------------------------------------------------

PRIOR = TimingModel(overhead_s=1e-3, per_token_s=1e-5, per_decode_s=1e-6, per_context_token_s=1e-7)


def test_online_model_starts_from_the_prior():
    online = OnlineTimingModel(PRIOR)
    shape = StepShape(100, 4, 400, 5050.0)
    assert online.step_time(shape) == PRIOR.step_time(shape)
    assert not online.fitted


def test_online_model_rescales_the_prior_by_the_median_ratio():
    """Decode-only steps cannot fit a model: the prior is scaled by median(measured / predicted), once
    ``refit_every`` steps came in."""
    online = OnlineTimingModel(PRIOR, refit_every=16)
    shapes = [StepShape(0, d, 100 * d, 0.0) for d in range(1, 17)]
    ratios = [1.5 + 0.1 * ((7 * i) % 16) for i in range(16)]
    probe = StepShape(500, 8, 800, 1e5)
    for s, r in zip(shapes, ratios, strict=True):
        assert online.step_time(probe) == PRIOR.step_time(probe)
        online.record(s, r * PRIOR.step_time(s))
    assert not online.fitted
    assert online.step_time(probe) == pytest.approx(float(np.median(ratios)) * PRIOR.step_time(probe))


def test_online_model_switches_to_a_fresh_fit_with_enough_samples():
    """8 steps with a prefill and 8 with decodes are needed; until then the prior stays (rescaled)."""
    online = OnlineTimingModel(PRIOR, refit_every=8)
    decode_only = [StepShape(0, d, 150 * d, 0.0) for d in range(1, 9)]
    prefill_only = [StepShape(p, 0, 0, p * (p + 1) / 2) for p in range(64, 64 * 9, 64)]
    probe = StepShape(300, 16, 3000, 300 * 400.0)
    for s in decode_only + prefill_only[:7] + decode_only[:1]:
        online.record(s, TRUE.step_time(s))
    assert not online.fitted  # 7 prefill steps only
    assert online.step_time(probe) != pytest.approx(TRUE.step_time(probe), rel=1e-3)

    mixed = [s for s in random_shapes(60, seed=7) if s.num_prefill_tokens and s.num_decodes][:8]
    for s in mixed:
        online.record(s, TRUE.step_time(s))
    assert online.fitted
    assert coefficients(online.model) == pytest.approx(coefficients(TRUE), rel=1e-5)
    assert online.step_time(probe) == pytest.approx(TRUE.step_time(probe), rel=1e-6)


def test_online_model_keeps_its_fit_through_decode_only_windows():
    online = OnlineTimingModel(PRIOR, window=8, refit_every=8)
    probe = StepShape(300, 16, 3000, 300 * 400.0)
    for s in [s for s in random_shapes(60, seed=9) if s.num_prefill_tokens and s.num_decodes][:8]:
        online.record(s, TRUE.step_time(s))
    assert online.fitted
    assert online.step_time(probe) == pytest.approx(TRUE.step_time(probe), rel=1e-6)
    for d in range(1, 9):  # a window without prefills: neither a refit nor a rescale
        s = StepShape(0, d, 100 * d, 0.0)
        online.record(s, 10 * TRUE.step_time(s))
    assert online.fitted
    assert online.step_time(probe) == pytest.approx(TRUE.step_time(probe), rel=1e-6)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file"),
        ("{not json", "Expecting"),
        ('{"overhead_s": -1}', "overhead_s"),
        ("[1, 2]", "object"),
    ],
)
def test_a_bad_profile_is_a_typed_error_naming_the_field(tmp_path, content, why):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidRequestError, match=why) as info:
        TimingModel.load(path)
    assert info.value.field == "timing_profile"
