"""Who gives up their KV blocks when the pool or the sequence slots run out.

Two policies:

- ``priority`` (default): the victim is the running request of lowest
  priority, then the one with the fewest computed tokens (the least work to
  redo), then the newest. A waiting request may take the place of running ones
  only when it outranks them by at least ``preemption_priority_gap``.
- ``fcfs``: first come, first served; priorities are ignored. When a running
  request needs a block the most recently admitted running request is
  preempted, and waiting requests never preempt.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.engine.request import Request

POLICIES = ("priority", "fcfs")


def pick_victim(candidates: Iterable[Request], policy: str, arrival: dict[str, int]) -> Request | None:
    """The request to preempt among ``candidates`` (in admission order), or None if there are none."""
    pool = list(candidates)
    if not pool:
        return None
    if policy == "fcfs":
        return pool[-1]
    return min(pool, key=lambda r: (r.priority, r.num_computed_tokens, -arrival.get(r.request_id, 0)))
