"""Several endpoints behind one client: least in-flight first, and failing ones set aside.

Endpoints are workers with no router in front, or several routers. A request
goes to the endpoint with the fewest requests in flight (ties go round in
turn, so an idle fleet still spreads). An endpoint that fails to connect, or
answers 5xx ``eject_after`` times in a row, is ejected for ``eject_s`` seconds,
doubling on each ejection in a row up to ``max_eject_s``; when every endpoint
is ejected, the one whose ejection ends first is tried anyway rather than
failing the caller. An endpoint that answers 429 is busy for its ``Retry-After``
(``done(..., busy_for=...)``): the next requests prefer the others, since the
one that refuses at once always has the fewest in flight and would otherwise
take every retry; it is not ejected, and is still used when all are busy.
Requests of one session keep to one endpoint (see ``pick``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    failures_in_row: int = 0  # failed requests since the last success
    ejections_in_row: int = 0
    ejected_until: float = 0.0
    busy_until: float = 0.0  # it answered 429 or 503 with its Retry-After: others first until then

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def busy(self, now: float) -> bool:
        return now < self.busy_until


class EndpointSet:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        eject_after: int = 3,
        eject_s: float = 1.0,
        max_eject_s: float = 30.0,
        affinity_slack: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("base_url: at least one endpoint URL is needed")
        seen: set[str] = set()
        for url in urls:
            check_url(url)
            if url.rstrip("/") in seen:
                raise ValueError(f"base_url {url!r} is given twice")
            seen.add(url.rstrip("/"))
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.max_eject_s = max_eject_s
        self.affinity_slack = affinity_slack
        self._clock = clock
        self._turn = itertools.count()

    def pick(self, session: str | None = None) -> Endpoint:
        """The endpoint for the next request (its in-flight count is taken; call ``done`` after).

        A ``session`` keeps to one endpoint (chosen by rendezvous hashing, so sessions
        move only off an endpoint that leaves) where its conversation's prefix is
        cached, unless that endpoint is ejected or runs ``affinity_slack`` more
        requests than the least loaded one."""
        now = self._clock()
        healthy = [e for e in self.endpoints if not e.ejected(now)]
        ready = [e for e in healthy if not e.busy(now)]
        healthy = ready or healthy  # all busy: the quotas they asked for are the dispatcher's to wait
        if healthy and session is not None:
            home = max(healthy, key=lambda e: _rendezvous(session, e.url))
            if home.in_flight - min(e.in_flight for e in healthy) <= self.affinity_slack:
                home.in_flight += 1
                return home
        if healthy:
            fewest = min(e.in_flight for e in healthy)
            ties = [e for e in healthy if e.in_flight == fewest]
            chosen = ties[next(self._turn) % len(ties)]
        else:
            chosen = min(self.endpoints, key=lambda e: e.ejected_until)
        chosen.in_flight += 1
        return chosen

    def done(
        self, endpoint: Endpoint, *, failed: bool, unreachable: bool = False, busy_for: float | None = None
    ) -> None:
        """The request on ``endpoint`` ended; ``failed``: the endpoint's fault (5xx, no connection);
        ``busy_for``: it answered 429, asking for that many seconds (its ``Retry-After``)."""
        endpoint.in_flight -= 1
        if busy_for is not None and busy_for > 0:  # (NaN and negatives: no pause)
            # Capped like an ejection: a Retry-After of hours must not set it aside for hours.
            endpoint.busy_until = max(endpoint.busy_until, self._clock() + min(busy_for, self.max_eject_s))
        if not failed:
            endpoint.failures_in_row = 0
            endpoint.ejections_in_row = 0
            return
        endpoint.failures_in_row += 1
        if unreachable or endpoint.failures_in_row >= self.eject_after:
            seconds = min(self.max_eject_s, self.eject_s * 2**endpoint.ejections_in_row)
            endpoint.ejections_in_row += 1
            endpoint.failures_in_row = 0
            endpoint.ejected_until = self._clock() + seconds
            logger.warning("endpoint %s ejected for %.1f s after failures", endpoint.url, seconds)

    def wait_s(self) -> float:
        """Seconds until an endpoint not ejected stops being busy (it answered 429 or 503): 0 when
        one is ready now, or when every one is ejected (``pick`` then takes the one back first)."""
        now = self._clock()
        healthy = [e for e in self.endpoints if not e.ejected(now)]
        if not healthy or any(not e.busy(now) for e in healthy):
            return 0.0
        return min(e.busy_until for e in healthy) - now

    def healthy_count(self) -> int:
        now = self._clock()
        return sum(not e.ejected(now) for e in self.endpoints)


def check_url(url: str, option: str = "base_url") -> None:
    """Raise ValueError naming ``option`` unless ``url`` is http(s)://host[:port] or grpc://host:port."""
    allowed = "allowed http://host:port, https://host or grpc://host:port (port 1 to 65535)"
    try:
        # urlsplit raises for brackets that are no IPv6 address ("http://[x]"), .port for a port
        # that is not a number or past 65535
        parts = urlsplit(url)
        scheme, hostname, port = parts.scheme, parts.hostname, parts.port
    except ValueError:
        scheme, hostname, port = "", None, 0
    if scheme not in ("http", "https", "grpc") or not hostname or port == 0:
        raise ValueError(f"{option} {url!r} is invalid: {allowed}")


def _rendezvous(session: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\0{url}".encode(), digest_size=8).digest(), "big")
