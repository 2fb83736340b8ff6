"""SamplingParams.validate: every front (HTTP, gRPC, the LLM API) reaches it, so it refuses what HTTP does."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.protocol.openai_common import SamplingRequest

FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def refused(**fields) -> str | None:
    """The field validate names, or None if it accepts."""
    try:
        SamplingParams(**fields).validate()
    except InvalidRequestError as e:
        return e.field
    return None


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_values_are_refused_for_every_float_field(field, value):
    assert refused(**{field: value}) == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 100.0001),
        ("temperature", 1e300),
        ("repetition_penalty", 100.5),
        ("repetition_penalty", 10**400),  # an int too large for a float is refused, not an OverflowError
    ],
)
def test_the_upper_bounds_http_applies_hold_here_too(field, value):
    assert refused(**{field: value}) == field


def test_the_message_names_the_field_the_value_and_the_range():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(temperature=math.inf).validate()
    assert str(e.value) == "temperature=inf is invalid: allowed a number >= 0 and <= 100 (0 means greedy)"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(repetition_penalty=101).validate()
    assert str(e.value) == "repetition_penalty=101 is invalid: allowed a number in (0, 100] (1 means none)"


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize(
    "value", [-2.5, -2.0, -1e-9, 0.0, 1e-300, 0.5, 1.0, 1.0001, 2.0, 2.0001, 50.0, 100.0, 100.0001, 1e300]
)
def test_the_engine_and_http_agree_on_every_float_value(field, value):
    """HTTP's pydantic model and the engine accept exactly the same values, so a gRPC or LLM API caller
    gets no more than an HTTP one."""
    try:
        SamplingRequest.model_validate({field: value})
        http_ok = True
    except ValidationError:
        http_ok = False
    assert (refused(**{field: value}) is None) == http_ok


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**100, -(2**63) - 1, True, 7.0, "7"])
def test_a_seed_outside_int64_is_refused_not_aliased(seed):
    """The sampler works in 64 bits: 2**64 would draw as 0 does. vLLM and the gRPC wire bound seeds alike."""
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(seed=seed).validate()
    assert e.value.field == "seed" and "int64" in str(e.value)


@pytest.mark.parametrize("seed", [None, 0, -1, 2**63 - 1, -(2**63)])
def test_every_int64_seed_is_accepted(seed):
    assert refused(seed=seed) is None
