"""Paired comparison of two models on the same questions: McNemar's exact test, Wilson intervals.

With 40-50 questions, two accuracies' separate confidence intervals overlap
unless the models are far apart; what tells them apart is the questions where
they disagree. McNemar's test looks only at those: ``b`` questions only model A
got right, ``c`` only model B; under "equally good" each discordant question is
a fair coin, so the two-sided exact p-value is the binomial tail of
``min(b, c)`` in ``b + c`` tosses, doubled (capped at 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PairedResult:
    only_a: int  # b: questions A got right and B wrong
    only_b: int  # c
    both: int
    neither: int
    p_value: float  # McNemar, exact, two-sided


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(a: Sequence[bool], b: Sequence[bool]) -> PairedResult:
    """A and B graded on the same questions, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"the two models were graded on {len(a)} and {len(b)} questions: pair them first")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    both = sum(x and y for x, y in zip(a, b, strict=True))
    return PairedResult(only_a, only_b, both, len(a) - only_a - only_b - both, mcnemar_exact(only_a, only_b))


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (sound at small n and near 0 or 1)."""
    if total <= 0:
        raise ValueError("total must be >= 1")
    p = correct / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)
