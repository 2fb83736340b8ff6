"""The router as a gateway for many teams: who is asking, what they may use, what they used.

For each request: the key (``Authorization: Bearer`` or ``x-api-key``) names a
team (401 otherwise); the team must be allowed the model (403); its priority
is the team's class, or lower if the request asks (``priority`` in the body or
``x-tokenmill-priority``), never higher, and is forwarded in the body; the
limits reserve what the request may use (429 with ``Retry-After`` and the
limit named, ``router/limits.py``); a usage row is opened as the request is
forwarded (on disk before the client gets a byte), and closed with the tokens
the worker reports when it ends, however it ends (``router/ledger.py``).
Gateway-only fields are stripped before forwarding: the key headers, and
``metadata`` (a JSON object of tags kept with the usage row). A request that
names no max_tokens (nor max_completion_tokens) is sent the max_tokens a
sequence it reserved (``limits.default_output``): without one a worker would
generate to the end of the context. It is sent with ``truncate_max_tokens``, so
that a prompt leaving less room is answered up to the context's end, as the
client asked, not refused for a limit it did not set. Every other field goes to
the worker unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.protocol.headers import PRIORITY_HEADER, TENANT_HEADER
from tokenmill.router.admission import AdmissionQueue, QueuePolicy
from tokenmill.router.call import asked_output
from tokenmill.router.gateway_config import GatewayConfig, Price, Team
from tokenmill.router.gateway_keys import GatewayKeys
from tokenmill.router.gateway_request import (
    GatewayError,
    check_priced,
    model_for,
    priority_for,
    refusal_reason,
    with_priority,
)
from tokenmill.router.gateway_request import body_for as body_for  # (imported from here by the app)
from tokenmill.router.gateway_start import apply_config_teams, warn_unpriced
from tokenmill.router.ledger import Ledger
from tokenmill.router.limits import Limiter, Refusal, Reservation, default_output, tokens_to_reserve
from tokenmill.router.usage_batch import Closing, UsageRow
from tokenmill.router.usage_meter import Usage, ask_for_usage, charged

logger = logging.getLogger(__name__)

KEY_HEADERS = ("authorization", "x-api-key")


@dataclass(eq=False)  # one per request, told apart by identity (Gateway._running)
class Admitted:
    """A request let through: what it reserved and where its usage goes."""

    team: Team
    key_id: str
    request_id: str
    model: str
    priority: int
    prompt_tokens: int  # the router's estimate, until the worker says
    row: UsageRow
    reservation: Reservation
    client_wants_usage: bool
    started: float  # time.monotonic(), for its latency
    price: Price | None
    body: bytes  # what goes to the worker
    checkpointed: int = 0  # completion tokens its row holds while it runs (Gateway.checkpoint)


class Gateway(GatewayKeys):
    def __init__(self, config: GatewayConfig, ledger: Ledger | None = None, starting: bool = True) -> None:
        """``starting``: the gateway that serves, which applies the config's teams to the ledger;
        False for ``tokenmill keys``, which changes no team (its teams: the ledger's, and those the
        config names that the ledger has not yet, for keys made before the first start)."""
        self.config = config
        self.ledger = ledger or Ledger(config.ledger, config.price)  # (the price: for its recovery)
        if starting:
            self.teams = apply_config_teams(config, self.ledger)
        else:
            self.teams = {**config.teams, **self.ledger.teams()}
        warn_unpriced(self.teams.values(), config.prices)
        self._init_keys()
        self.queues: dict[str, AdmissionQueue] = {}  # one admission queue per pool
        # (team, reason) -> requests refused before they had a usage row, since the start (metrics)
        self.refused: Counter[tuple[str, str]] = Counter()
        self._running: dict[Admitted, Callable[[], int]] = {}  # forwarded, not finished: their progress
        # Request ids: a random prefix per gateway process and a counter (unique without a syscall each).
        self._id_prefix = "gw-" + secrets.token_hex(6) + "-"
        self._ids = itertools.count(1)
        self.limiter = Limiter(self._spent)
        for team in self.teams.values():
            self.limiter.configure(team)
        # A restart must not refill the minute: the buckets start from the ledger's last minute.
        for name, recent in self.ledger.recent_usage(60.0).items():
            self.limiter.resume(name, recent)

    def _spent(self, team: Team) -> tuple[int, float]:
        assert team.budget is not None
        return self.ledger.spent(team.name, team.budget)

    # -- a request -------------------------------------------------------------------------

    def admit(
        self,
        request: dict[str, Any],
        body: bytes,
        headers: dict[str, str],
        prompt_tokens: int,
        output_tokens: int | None,
    ) -> Admitted:
        """Check and reserve; rewrites ``request`` (parsed from ``body``) for the worker (priority,
        usage, no metadata), with the body to send in ``Admitted.body``, and strips the gateway's
        headers from ``headers``. Raises GatewayError to refuse."""
        key_id, team = self._key_and_team(headers)
        try:
            return self._admit(team, key_id, request, body, headers, prompt_tokens, output_tokens)
        except GatewayError as e:
            self.refused[team.name, refusal_reason(e)] += 1
            raise

    def unreadable(self, headers: dict[str, str], message: str) -> GatewayError:
        """The answer to a request whose body is not a JSON object: as to any request, a 401
        without a valid key (the key is checked first), else a 400 saying why; counted."""
        try:
            _, team = self._key_and_team(headers)
        except GatewayError as e:
            return e
        self.refused[team.name, "invalid_request"] += 1
        return GatewayError(400, message, "invalid_request_error")

    def _admit(
        self,
        team: Team,
        key_id: str,
        request: dict[str, Any],
        body: bytes,
        headers: dict[str, str],
        prompt_tokens: int,
        output_tokens: int | None,
    ) -> Admitted:
        model = model_for(request, team)
        price = self.config.price(model)
        check_priced(model, team, price, self.config.prices)
        priority = priority_for(request, headers, team)
        rewritten = "metadata" in request or "priority" in request
        tags = request.pop("metadata", None)
        if tags is not None and not isinstance(tags, dict):
            raise GatewayError(
                400, "metadata must be a JSON object of tags", "invalid_request_error", "metadata"
            )
        if request.get("max_tokens") is None and request.get("max_completion_tokens") is None:
            # Held to what it reserves: sent without one, the worker would generate each sequence up
            # to the end of the context, far past the reservation and the team's limits.
            request["max_tokens"] = default_output(
                request, team, prompt_tokens, self.config.default_max_tokens, price
            )
            # The client named none, so it expects the answer cut at the end of the context, not a 400
            # for a limit it did not set: tokenmill workers cut this one to fit (vLLM ignores it).
            request["truncate_max_tokens"] = True
            output_tokens, rewritten = asked_output(request), True
        wants_usage = ask_for_usage(request)
        # The client's bytes can go as they are when adding the priority is the only change (a
        # stream that did not ask for usage exactly as the worker must see it gets it asked).
        forward = with_priority(body, priority) if wants_usage and not rewritten else None
        request["priority"] = priority
        for name in (*KEY_HEADERS, PRIORITY_HEADER):
            headers.pop(name, None)
        headers[TENANT_HEADER] = team.name  # the worker's logs and metrics can tell teams apart
        tokens = tokens_to_reserve(
            request, team, prompt_tokens, output_tokens, self.config.default_max_tokens, price
        )
        if isinstance(tokens, Refusal):
            verdict: Reservation | Refusal = tokens
        else:
            dollars = price.cost(prompt_tokens, tokens - prompt_tokens) if price else 0.0
            verdict = self.limiter.admit(team.name, tokens, dollars)
        if isinstance(verdict, Refusal):
            kind = "rate_limit_error" if verdict.status == 429 else "invalid_request_error"
            retry = verdict.retry_after if verdict.status == 429 else None
            raise GatewayError(verdict.status, verdict.message, kind, verdict.param or verdict.limit, retry)
        request_id = f"{self._id_prefix}{next(self._ids)}"
        try:
            row = self.ledger.open_request(
                request_id, team.name, key_id, model, priority, prompt_tokens, tags
            )
        except Exception:
            self.limiter.release(verdict, 0, 0.0)
            raise
        return Admitted(
            team,
            key_id,
            request_id,
            model,
            priority,
            prompt_tokens,
            row,
            verdict,
            wants_usage,
            time.monotonic(),
            price,
            forward or json.dumps(request).encode(),
        )

    def finish(
        self,
        a: Admitted,
        usage: Usage,
        status: str,
        http_status: int | None,
        worker: str | None,
        chunks: int | None = 0,
    ) -> None:
        """The request ended: release its reservation, close its usage row. ``chunks``: content
        chunks seen, the completion estimate when the worker never reported usage (None: a whole
        answer, which has no chunks to count)."""
        self._running.pop(a, None)
        prompt, completion = charged(
            usage, a.prompt_tokens, a.reservation.tokens, status, http_status, worker, chunks
        )
        cost = a.price.cost(prompt, completion) if a.price else 0.0
        self.limiter.release(a.reservation, prompt + completion, cost)
        latency = time.monotonic() - a.started
        closing = Closing(prompt, completion, status, http_status, worker, latency, cost)
        self.ledger.close_request(a.row, closing)

    def follow(self, a: Admitted, completion_so_far: Callable[[], int]) -> None:
        """Keep ``a``'s row up to date while it runs (``checkpoint``), until ``finish``."""
        self._running[a] = completion_so_far

    def checkpoint(self) -> int:
        """Write each running request's completion tokens so far to its row, so that a gateway
        killed mid-stream leaves the row charged with what its client was sent up to here, not
        with its prompt alone; and its worker, if chosen after the row was written. Returns the
        rows brought up to date."""
        updated = 0
        for a, so_far in self._running.items():
            done = so_far()
            moved = a.row.worker != a.row.worker_written
            if (done > a.checkpointed or moved) and self.ledger.progress(a.row, done):
                a.checkpointed = done
                updated += 1
        return updated

    async def checkpoint_forever(self) -> None:
        """``checkpoint`` every ``usage_checkpoint_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.config.usage_checkpoint_s)
            try:
                self.checkpoint()
            except Exception:  # a ledger error is logged where the commit fails; keep checkpointing
                logger.exception("the gateway could not checkpoint its running requests' usage")

    # -- admission -------------------------------------------------------------------------

    def queue(self, pool: str, capacity: Callable[[], int]) -> AdmissionQueue:
        """The pool's admission queue (made on first use); ``capacity()``: the pool's slots now."""
        queue = self.queues.get(pool)
        if queue is None:
            c = self.config
            policy = QueuePolicy(c.max_waiting, c.max_wait_s, c.aging_s, c.fair_queuing, c.overflow)
            queue = self.queues[pool] = AdmissionQueue(capacity, policy, self._weight)
        return queue

    def _weight(self, team: str) -> float:
        t = self.teams.get(team)
        return t.weight if t is not None else 1.0

    # -- administration --------------------------------------------------------------------

    def set_team(self, team: Team) -> None:
        warn_unpriced([team], self.config.prices)
        self.ledger.save_team(team)
        self.teams[team.name] = team
        self.limiter.configure(team)

    def delete_team(self, name: str) -> bool:
        gone = self.ledger.delete_team(name)
        self.teams.pop(name, None)
        self.limiter.forget(name)
        self._read_keys()
        return gone
