"""Per-team limits: requests and tokens per minute, parallel requests, a token or dollar budget.

A request reserves at admission what it may use: one request, its prompt
tokens plus ``max_tokens`` (and their price against a dollar budget), one
parallel slot. When it ends, the unused part is refunded (and a prompt that
proved longer than estimated is charged: the bucket may go below zero, and
the team waits it off). So a burst of
requests, or long streams still running, can never take a team past its
limit: what is in flight is already counted. Requests and tokens per minute
are token buckets holding a minute's allowance and refilling continuously.
Budgets run over UTC calendar periods (day, week from Monday, month) and are
checked against the ledger's totals for the period plus what is in flight.

A refusal names the limit and says when to retry (``Retry-After``): when the
bucket will hold enough, a slot frees up (1 s), or the budget's period ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.router.gateway_config import Team
from tokenmill.router.ledger import period_start


@dataclass(frozen=True)
class Refusal:
    limit: str  # requests_per_minute, tokens_per_minute, max_parallel, budget
    message: str
    retry_after: int  # seconds
    status: int = 429


@dataclass
class Reservation:
    team: str
    tokens: int
    dollars: float
    released: bool = False


@dataclass
class _Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


@dataclass
class _TeamState:
    team: Team
    requests: _Bucket | None
    tokens: _Bucket | None
    parallel: int = 0
    period: str = ""  # the budget period's first day, ISO
    spent_tokens: int = 0  # in the period, finished
    spent_dollars: float = 0.0
    held_tokens: int = 0  # reserved by requests in flight
    held_dollars: float = 0.0


class Limiter:
    def __init__(
        self,
        spent: Callable[[Team], tuple[int, float]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``spent(team)``: the ledger's tokens and dollars for the team's current budget period."""
        self._spent = spent
        self._clock = clock
        self._wall = wall
        self._teams: dict[str, _TeamState] = {}

    def configure(self, team: Team) -> None:
        """A team's limits, new or changed: buckets start full; what is in flight stays counted."""
        now = self._clock()
        old = self._teams.get(team.name)
        rpm, tpm = team.requests_per_minute, team.tokens_per_minute
        state = _TeamState(
            team,
            _Bucket(rpm, rpm, now) if rpm else None,
            _Bucket(tpm, tpm, now) if tpm else None,
        )
        if old is not None:
            state.parallel, state.held_tokens, state.held_dollars = (
                old.parallel,
                old.held_tokens,
                old.held_dollars,
            )
        self._teams[team.name] = state

    def forget(self, name: str) -> None:
        self._teams.pop(name, None)

    def admit(self, team: str, tokens: int, dollars: float, prompt_tokens: int = 0) -> Reservation | Refusal:
        """Reserve ``tokens`` (the prompt's ``prompt_tokens`` and the most it may generate) and
        ``dollars`` for a request of ``team``, or say which limit refuses it."""
        s = self._teams[team]
        t = s.team
        now = self._clock()
        if t.tokens_per_minute is not None and tokens > t.tokens_per_minute:
            room = t.tokens_per_minute - prompt_tokens
            fix = f"lower max_tokens to {room} or less" if room > 0 else "shorten the prompt"
            return Refusal(
                "tokens_per_minute",
                f"this request may use {tokens} tokens (prompt about {prompt_tokens} + max_tokens), more "
                f"than team {team}'s tokens_per_minute limit of {t.tokens_per_minute}: {fix}",
                0,
                status=400,
            )
        if t.max_parallel is not None and s.parallel >= t.max_parallel:
            return Refusal(
                "max_parallel",
                f"team {team} has {s.parallel} requests in flight (max_parallel {t.max_parallel})",
                1,
            )
        for name, bucket, amount in (
            ("requests_per_minute", s.requests, 1),
            ("tokens_per_minute", s.tokens, tokens),
        ):
            if bucket is not None:
                bucket.refill(now)
                if bucket.level < amount:
                    wait = math.ceil(bucket.wait_for(amount))
                    limit = int(bucket.capacity)
                    return Refusal(
                        name,
                        f"team {team} is over its {name} limit ({limit}); retry in {wait} s",
                        max(1, wait),
                    )
        refusal = self._check_budget(s, tokens, dollars)
        if refusal is not None:
            return refusal
        for bucket, amount in ((s.requests, 1), (s.tokens, tokens)):
            if bucket is not None:
                bucket.level -= amount
        s.parallel += 1
        s.held_tokens += tokens
        s.held_dollars += dollars
        return Reservation(team, tokens, dollars)

    def release(self, r: Reservation, used_tokens: int, used_dollars: float) -> None:
        """The request ended having used this much: refund the rest of what it reserved."""
        if r.released:
            return
        r.released = True
        s = self._teams.get(r.team)
        if s is None:
            return
        s.parallel -= 1
        s.held_tokens -= r.tokens
        s.held_dollars -= r.dollars
        if s.tokens is not None:  # refund what was not used; charge what was used past the reservation
            s.tokens.refill(self._clock())
            s.tokens.level = min(s.tokens.capacity, s.tokens.level + r.tokens - used_tokens)
        self._roll_period(s)
        s.spent_tokens += used_tokens
        s.spent_dollars += used_dollars

    def _check_budget(self, s: _TeamState, tokens: int, dollars: float) -> Refusal | None:
        b = s.team.budget
        if b is None:
            return None
        self._roll_period(s)
        if b.tokens is not None:
            over = s.spent_tokens + s.held_tokens + tokens > b.tokens
            used = f"{s.spent_tokens} tokens spent, {s.held_tokens} in flight, this request {tokens}"
            limit = f"{b.tokens} tokens"
        else:
            assert b.dollars is not None
            over = s.spent_dollars + s.held_dollars + dollars > b.dollars
            used = (
                f"${s.spent_dollars:.4f} spent, ${s.held_dollars:.4f} in flight, this request ${dollars:.4f}"
            )
            limit = f"${b.dollars:g}"
        if not over:
            return None
        wait = self._seconds_to_period_end(b.period)
        return Refusal(
            "budget", f"team {s.team.name}'s {b.period} budget of {limit} would be passed ({used})", wait
        )

    def _roll_period(self, s: _TeamState) -> None:
        b = s.team.budget
        if b is None:
            return
        start = period_start(b.period, self._wall()).isoformat()
        if start != s.period:  # a new period (or the first look): the ledger knows what was spent
            s.period = start
            s.spent_tokens, s.spent_dollars = self._spent(s.team)

    def _seconds_to_period_end(self, period: str) -> int:
        from datetime import UTC, datetime, timedelta

        now = self._wall()
        start = period_start(period, now)
        if period == "day":
            end = start + timedelta(days=1)
        elif period == "week":
            end = start + timedelta(days=7)
        else:
            end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
        end_ts = datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp()
        return max(1, math.ceil(end_ts - now))

    def in_flight(self, team: str) -> int:
        s = self._teams.get(team)
        return s.parallel if s else 0
