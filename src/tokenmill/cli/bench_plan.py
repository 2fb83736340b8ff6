"""What ``tokenmill bench run`` measures and how it is judged (``Plan``), the header every point's
report carries, and the reasons a sweep stops early."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.report import Cost
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource


@dataclass(frozen=True)
class Plan:
    """What to run and how to judge it."""

    profiles: list[LoadProfile]  # one: a run; several: a sweep
    search: bool  # --find-max-goodput
    target: float
    slo: SLO | None
    max_lag: float
    cost: Cost | None
    metrics_urls: list[str]
    check_tokens: int  # replies re-tokenized per point


class Stopped(Exception):
    """Ctrl-C between the points of a sweep."""


class Refused(Exception):
    """Every request of a point was refused (4xx): a wrong key, model or request, which no
    other load fixes, so a sweep or search stops there."""


class ServerGone(Exception):
    """The server stopped answering: a sweep or search stops after writing what it has."""


def run_info(
    settings: RunSettings, model: str | None, profile: LoadProfile, source: DataSource, n: int, stopped: bool
) -> dict[str, Any]:
    return {
        "url": settings.url,
        "model": model,
        "endpoint": settings.endpoint,
        "profile": profile.label,
        "data": source.describe(),
        "requests": n,
        "stopped_early": stopped,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": settings.seed,
    }
