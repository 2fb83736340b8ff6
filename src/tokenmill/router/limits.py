"""Per-team limits: requests and tokens per minute, parallel requests, a token or dollar budget.

A request reserves at admission what it may use: one request, its prompt
tokens plus ``max_tokens`` for each sequence it asks (every prompt of a batch
times ``n``; ``tokens_to_reserve``) and their price against a dollar budget,
one parallel slot. When it ends, the unused part is refunded (and a prompt that
proved longer than estimated is charged: the bucket may go below zero, and
the team waits it off). So a burst of
requests, or long streams still running, can never take a team past its
limit: what is in flight is already counted. Requests and tokens per minute
are token buckets holding a minute's allowance and refilling continuously; a
gateway that starts takes its teams' last minute from the ledger (``resume``),
so a restart does not hand out a fresh minute.
Budgets run over UTC calendar periods (day, week from Monday, month) and are
checked against the ledger's totals for the period plus what is in flight.

A refusal names the limit and says when to retry (``Retry-After``): when the
bucket will hold enough, a slot frees up (1 s), or the budget's period ends.
A request that could never be let through, more than a whole minute's tokens
or a whole budget period (tokens, or dollars at the model's price), is a 400
naming the request's field to change instead: no wait would help.
Changing a team's limits keeps its buckets' levels (clamped to a smaller
capacity), so a reconfigure never refills them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.router.call import MAX_OUTPUT_TOKENS, choices, choices_field, output_field, sequences
from tokenmill.router.gateway_config import Price, Team
from tokenmill.router.ledger import period_start


@dataclass(frozen=True)
class Refusal:
    limit: str  # requests_per_minute, tokens_per_minute, max_parallel, budget
    message: str
    retry_after: int  # seconds
    status: int = 429
    param: str | None = None  # for a 400: the request's field to change (the error's param)


@dataclass
class Reservation:
    team: str
    tokens: int
    dollars: float
    # The team's state it was taken from: given back there, not to a team of the same name made
    # after this one was deleted (which would then count fewer requests in flight than run).
    state: _TeamState = field(repr=False, compare=False)
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


def _carried(old: _Bucket | None, capacity: int | None, now: float) -> _Bucket | None:
    """A bucket of ``capacity`` a minute that goes on from ``old``'s level (full if none)."""
    if not capacity:
        return None
    if old is None:
        return _Bucket(capacity, capacity, now)
    old.refill(now)  # at the old rate up to now
    return _Bucket(capacity, min(old.level, capacity), now)


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


def tokens_to_reserve(
    request: dict[str, Any],
    team: Team,
    prompt_tokens: int,
    asked: int | None,
    default_max_tokens: int,
    price: Price | None = None,
) -> int | Refusal:
    """Tokens a request reserves: its prompt and the most all its sequences may generate
    (``asked``, ``call.asked_output``); one that names no max_tokens, ``default_output`` a
    sequence. One that could never be let through, over the team's whole minute or whole budget
    (tokens, or dollars at the model's ``price``), is refused (400) naming the request's field to
    change: no wait would let it through, and a 429 would have its client retry in vain."""
    if asked is None:
        asked = default_output(request, team, prompt_tokens, default_max_tokens, price) * sequences(request)
    tokens = prompt_tokens + asked
    if team.tokens_per_minute is None and team.budget is None:
        return tokens
    ceiling = _ceiling(team, prompt_tokens, price)
    if ceiling is not None and tokens > ceiling.tokens:
        return _never_fits(request, team.name, ceiling, prompt_tokens, tokens)
    return tokens


def default_output(
    request: dict[str, Any],
    team: Team,
    prompt_tokens: int,
    default_max_tokens: int,
    price: Price | None = None,
) -> int:
    """Output tokens a sequence of a request that names no max_tokens reserves, and is held to
    (the gateway forwards it as the request's max_tokens: else the worker would generate up to the
    end of its context, far past the reservation). ``default_max_tokens``, lowered to what the
    team's tokens_per_minute or whole budget leaves after the prompt, so that a team with a small
    minute or budget can still send it (what the worker reports settles the difference at the
    end); all sequences together at most what a worker can be asked."""
    count = sequences(request)
    each = min(default_max_tokens, MAX_OUTPUT_TOKENS // count)
    if team.tokens_per_minute is None and team.budget is None:
        return each
    ceiling = _ceiling(team, prompt_tokens, price)
    if ceiling is not None and ceiling.tokens - prompt_tokens >= count:
        each = min(each, (ceiling.tokens - prompt_tokens) // count)
    return each


@dataclass(frozen=True)
class _Ceiling:
    """The most tokens, prompt and output, one request may reserve under a team's limit."""

    tokens: int
    limit: str  # tokens_per_minute or budget (the Refusal's)
    what: str  # the limit, for the message


def _ceiling(team: Team, prompt_tokens: int, price: Price | None) -> _Ceiling | None:
    """The lowest of the team's ceilings: a whole minute, a whole budget period (its tokens, or
    its dollars at the model's price, for this prompt); None without either."""
    found = None
    if team.tokens_per_minute is not None:
        tpm = team.tokens_per_minute
        found = _Ceiling(tpm, "tokens_per_minute", f"tokens_per_minute limit of {tpm}")
    b = team.budget
    if b is not None:
        tokens, what = None, f"{b.period} budget of {b.tokens} tokens"
        if b.tokens is not None:
            tokens = b.tokens
        elif b.dollars is not None and price is not None:
            tokens = _affordable(b.dollars, price, prompt_tokens)
            what = (
                f"{b.period} budget of ${b.dollars:g} ({tokens} tokens with this prompt, at "
                f"${price.prompt:g} and ${price.completion:g} per million prompt and completion tokens)"
            )
        if tokens is not None and (found is None or tokens < found.tokens):
            found = _Ceiling(tokens, "budget", what)
    return found


def _affordable(dollars: float, price: Price, prompt_tokens: int) -> int | None:
    """The prompt and the most output tokens ``dollars`` pay for at ``price`` (less than the prompt
    when the prompt alone costs more); None when the output is free."""
    left = dollars - price.cost(prompt_tokens, 0)
    if left < 0:
        return prompt_tokens - 1
    if price.completion <= 0:
        return None
    ratio = left * 1e6 / price.completion
    output = MAX_OUTPUT_TOKENS if ratio >= MAX_OUTPUT_TOKENS else math.floor(ratio)
    while output > 0 and price.cost(prompt_tokens, output) > dollars:  # (float rounding: a step or two)
        output -= 1
    return prompt_tokens + output


def _never_fits(
    request: dict[str, Any], team: str, ceiling: _Ceiling, prompt_tokens: int, tokens: int
) -> Refusal:
    count = sequences(request)
    per = choices_field(request)  # what multiplies the prompts: n, or best_of when larger
    prompt_field = "messages" if request.get("messages") is not None else "prompt"
    room = ceiling.tokens - prompt_tokens
    if room <= 0:
        param, fix = prompt_field, f"shorten the {prompt_field}"
    elif room >= count:
        param = output_field(request)
        fix = f"lower {param} to {room // count} or less"
        if count > 1:
            fix += f" (it is reserved for each of the request's {count} sequences, prompts × {per})"
    else:
        param = per if choices(request) > 1 else prompt_field
        fix = f"ask for fewer than {count} sequences (prompts × {per}): {room} tokens are left after "
        fix += "the prompt"
    each = f"{count} × max_tokens" if count > 1 else "max_tokens"
    return Refusal(
        ceiling.limit,
        f"this request may use {tokens} tokens (prompt about {prompt_tokens} + {each}), "
        f"more than team {team}'s {ceiling.what}: {fix}",
        0,
        status=400,
        param=param,
    )


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
        """A team's limits, new or changed. What is in flight stays counted, and the buckets keep
        their levels: a reconfigure (``POST /admin/teams``, even unchanged) must not hand a team
        a fresh minute. A smaller capacity clamps the level; a larger one is reached by refilling
        at the new rate, not granted at once. A limit the team did not have starts full."""
        now = self._clock()
        old = self._teams.get(team.name)
        rpm, tpm = team.requests_per_minute, team.tokens_per_minute
        requests = _carried(old.requests if old else None, rpm, now)
        tokens = _carried(old.tokens if old else None, tpm, now)
        if old is None:
            self._teams[team.name] = _TeamState(team, requests, tokens)
        else:  # changed in place: the reservations of what runs point at it (Reservation.state)
            old.team, old.requests, old.tokens = team, requests, tokens
            old.period = ""  # (the budget may have changed: re-read from the ledger)

    def forget(self, name: str) -> None:
        self._teams.pop(name, None)

    def resume(self, team: str, recent: list[tuple[float, int]]) -> None:
        """Start ``team``'s minute buckets from its last minute of usage, ``(seconds ago, tokens)``
        per request (the ledger's, as a gateway starts): else a restart would hand every team a
        full minute on top of the one it just used. Each request's share is taken as refilled
        evenly over the minute after it, which is the bucket's own rate while it is not full."""
        s = self._teams.get(team)
        if s is None:
            return
        unrefilled = [(max(0.0, 1.0 - age / 60.0), tokens) for age, tokens in recent]
        owed_requests = sum(share for share, _ in unrefilled)
        owed_tokens = sum(share * tokens for share, tokens in unrefilled)
        for bucket, owed in ((s.requests, owed_requests), (s.tokens, owed_tokens)):
            if bucket is not None:
                bucket.level = min(bucket.level, bucket.capacity - owed)

    def admit(self, team: str, tokens: int, dollars: float) -> Reservation | Refusal:
        """Reserve ``tokens`` (the prompt's and the most it may generate) and ``dollars`` for a
        request of ``team``, or say which limit refuses it. A request over a whole minute's
        tokens is refused before (``tokens_to_reserve``): here it would only wait."""
        s = self._teams[team]
        t = s.team
        now = self._clock()
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
        return Reservation(team, tokens, dollars, s)

    def release(self, r: Reservation, used_tokens: int, used_dollars: float) -> None:
        """The request ended having used this much: refund the rest of what it reserved."""
        if r.released:
            return
        r.released = True
        s = r.state
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
