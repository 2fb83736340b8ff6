"""McNemar's exact test and Wilson intervals against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.evals.paired import compare, mcnemar_exact, wilson_interval


def test_mcnemar_known_values():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # six discordant, all one way


def test_compare_counts_the_four_cells():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    r = compare(a, b)
    assert (r.only_a, r.only_b, r.both, r.neither) == (2, 1, 1, 1)
    assert r.p_value == 1.0
    with pytest.raises(ValueError, match="pair them"):
        compare([True], [True, False])


def test_wilson_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)


@given(st.integers(0, 60), st.integers(0, 60))
def test_p_value_is_a_probability_and_symmetric(b, c):
    p = mcnemar_exact(b, c)
    assert 0 < p <= 1 and p == mcnemar_exact(c, b)
    assert not math.isnan(p)
