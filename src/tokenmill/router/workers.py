"""The workers behind a router and what it knows of each: health, load, what was routed there.

Load is counted by the router itself (requests and tokens in flight through
it), so it is exact for the traffic it sees and needs nothing from the worker.
Health has two sources: active checks of ``/health`` and passive ones (a
connection error or a 5xx). A worker that fails ``EJECT_AFTER`` times in a row
is ejected; once healthy again it is re-admitted with a slow ramp, its share
of new requests growing over ``RAMP_S`` seconds so a restored worker is not
flooded at once.

Models: each worker's served model ids (its ``/v1/models``, read by the health
checks) keep a request naming a model off the workers that do not serve it.
A worker whose models are not known yet (or that does not list them) takes any
model, as before the router knew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tokenmill.router.calibration import StepCostFit, WorkerCounters

EJECT_AFTER = 3  # consecutive failures
RAMP_S = 10.0  # seconds for a re-admitted worker to take its full share


@dataclass
class Worker:
    url: str  # base URL, no /v1
    name: str = ""  # x-tokenmill-worker when known, else the URL
    pool: str | None = None  # latency or throughput (gateway pools); None serves both
    healthy: bool = True
    draining: bool = False  # takes no new requests; its streams finish
    failures: int = 0  # consecutive
    admitted_at: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    in_flight_tokens: int = 0  # prompt + asked output tokens of requests in flight
    in_flight_output: int = 0  # asked output tokens of requests in flight
    in_flight_sequences: int = 0  # their sequences (n, best_of, batched prompts): the batch they make
    pending_prefill: int = 0  # prompt tokens routed here, not yet cached there, whose first byte is still due
    routed: int = 0
    routed_tokens: int = 0  # of requests it accepted (a 400's asked tokens were never work)
    failed: int = 0
    predicted_hit_tokens: int = 0  # prompt tokens a cache-aware policy expected cached here
    step_cost: StepCostFit = field(default_factory=StepCostFit)  # from the worker's /metrics
    counters: WorkerCounters | None = None  # the last scrape of its /metrics (measured cache hits)
    slots: int | None = None  # requests it runs at once, as its /metrics reports (gateway admission)
    engine: str | None = None  # tokenmill, vllm or sglang, as its /metrics names show
    models: frozenset[str] | None = None  # the model ids its /v1/models lists; None: not known (any)

    def __post_init__(self) -> None:
        self.name = self.name or self.url

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    def serves(self, model: str | None) -> bool:
        """Whether it may take a request naming ``model`` (None: a request naming none)."""
        return model is None or self.models is None or model in self.models

    @property
    def measured_hit_rate(self) -> float | None:
        """The share of prompt tokens the worker itself reports found in its prefix cache."""
        c = self.counters
        if c is None or c.cache_hits is None or not c.cache_queries:
            return None
        return c.cache_hits / c.cache_queries

    def ramp(self, now: float | None = None) -> float:
        """Share of a full worker's load this one should take now, (0, 1]."""
        age = (now if now is not None else time.monotonic()) - self.admitted_at
        return min(1.0, max(0.1, age / RAMP_S))


class WorkerPool:
    """The workers, by URL; add, drain and remove while requests run."""

    def __init__(self, urls: list[str]) -> None:
        self._workers: dict[str, Worker] = {}
        # Bumped by every change to which workers are available or to their slots, so that what
        # is derived from them (the gateway's capacity) is recomputed only then.
        self.version = 0
        self._slots: dict[tuple[str | None, int], tuple[int, int]] = {}  # (pool, default) -> (version, slots)
        # (version, any available, any of those with models unknown, the models the others list)
        self._served: tuple[int, bool, bool, frozenset[str]] | None = None
        # Told when passive health ejects a worker (the router's app: the gateway's admission queues
        # take the capacity change at once). A release dispatches only its own pool's queue, so a
        # queue falling back on this pool, or left with no worker at all, would otherwise wait for
        # the next health round.
        self.on_eject: Callable[[], None] | None = None
        for url in urls:
            self.add(url, ramp=False)

    def add(self, spec: str, ramp: bool = True) -> Worker:
        """A worker by URL, optionally labelled with its pool: ``http://host:port#latency``."""
        url, pool = parse_worker(spec)
        self.version += 1
        if url in self._workers:
            w = self._workers[url]
            w.draining = False
            w.pool = pool
            return w
        w = Worker(url, pool=pool)
        if not ramp:
            w.admitted_at -= RAMP_S
        self._workers[url] = w
        return w

    def drain(self, url: str) -> Worker:
        w = self.get(url)
        w.draining = True
        self.version += 1
        return w

    def remove(self, url: str) -> Worker:
        """Forget a worker; requests already there finish (their Worker object lives on)."""
        w = self.get(url)
        del self._workers[w.url]
        self.version += 1
        return w

    def get(self, url: str) -> Worker:
        try:
            return self._workers[normalize(url)]
        except KeyError:
            raise KeyError(f"no worker {url!r}; workers: {', '.join(self._workers) or 'none'}") from None

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def available(self, pool: str | None = None, model: str | None = None) -> list[Worker]:
        """Workers taking requests (with ``model``, those that serve it); with ``pool``, those of
        that pool (or of none), or, when the pool has none up, the others: a pool falls back to the
        rest only while it is down (or, for a model, while none of it serves that model)."""
        if model is None:
            up = [w for w in self._workers.values() if w.available]
        else:
            up = [w for w in self._workers.values() if w.available and w.serves(model)]
        if pool is None:
            return up
        mine = [w for w in up if w.pool in (pool, None)]
        return mine or up

    def serves(self, model: str) -> bool | None:
        """Whether an available worker may take ``model`` (one that lists it, or one whose models
        are not known); None when no worker is available at all. Asked per request behind the
        gateway (before it waits in a queue), so a set lookup, recomputed only when workers change."""
        served = self._served
        if served is None or served[0] != self.version:
            avail = [w for w in self._workers.values() if w.available]
            known = frozenset().union(*(w.models for w in avail if w.models is not None))
            served = self._served = (self.version, bool(avail), any(w.models is None for w in avail), known)
        _, some, unknown, known = served
        return (unknown or model in known) if some else None

    def served_models(self) -> list[str]:
        """The models the available workers list, for an error naming them."""
        return sorted({m for w in self.available() for m in w.models or ()})

    # -- what requests report ---------------------------------------------------------------

    def started(self, w: Worker, tokens: int, output: int = 0, sequences: int = 1) -> None:
        w.in_flight += 1
        w.in_flight_tokens += tokens
        w.in_flight_output += output
        w.in_flight_sequences += sequences
        w.routed += 1

    def finished(self, w: Worker, tokens: int, output: int = 0, sequences: int = 1) -> None:
        w.in_flight -= 1
        w.in_flight_tokens -= tokens
        w.in_flight_output -= output
        w.in_flight_sequences -= sequences

    def succeeded(self, w: Worker) -> None:
        w.failures = 0

    def failed(self, w: Worker) -> None:
        """A connection error or a 5xx: passive health."""
        w.failed += 1
        w.failures += 1
        if w.failures >= EJECT_AFTER and w.healthy:
            w.healthy = False
            self.version += 1
            if self.on_eject is not None:
                self.on_eject()

    def health(self, w: Worker, ok: bool) -> None:
        """An active check's result."""
        if ok:
            w.failures = 0
            if not w.healthy:  # re-admitted: ramp up from here
                w.healthy = True
                w.admitted_at = time.monotonic()
                self.version += 1
        else:
            self.failed(w)

    def slots(self, pool: str | None, default: int) -> int:
        """Requests the pool's available workers run at once, as their metrics report (``default``
        for those that do not): the gateway's capacity, asked at every admission and release, so
        recomputed only when the workers change."""
        known = self._slots.get((pool, default))
        if known is not None and known[0] == self.version:
            return known[1]
        total = sum(w.slots or default for w in self.available(pool))
        self._slots[(pool, default)] = (self.version, total)
        return total

    def set_models(self, w: Worker, models: frozenset[str] | None) -> None:
        """The models ``w`` serves, as its /v1/models lists them (None: not known)."""
        if w.models != models:
            w.models = models
            self.version += 1

    def set_slots(self, w: Worker, slots: int) -> None:
        """The requests ``w`` runs at once, as its metrics report."""
        if w.slots != slots:
            w.slots = slots
            self.version += 1

    def imbalance(self) -> float:
        """max / mean of in-flight tokens over available workers (1.0 when even or idle)."""
        loads = [w.in_flight_tokens for w in self.available()]
        mean = sum(loads) / len(loads) if loads else 0
        return max(loads) / mean if mean > 0 else 1.0


POOLS = ("latency", "throughput")


def parse_worker(spec: str) -> tuple[str, str | None]:
    """``URL`` or ``URL#pool`` -> (normalized URL, pool or None)."""
    url, _, pool = spec.strip().partition("#")
    if pool and pool not in POOLS:
        raise ValueError(
            f"a worker's pool (after #) must be one of {', '.join(POOLS)}, got {pool!r} in {spec!r}"
        )
    return normalize(url), pool or None


def normalize(url: str) -> str:
    """The worker's base URL as the router keys it; ValueError naming it if it cannot be reached as
    written (scheme, host, port), so a typo is refused where it is given, not found later by the
    health checks or by a request routed there."""
    url = url.strip().partition("#")[0].rstrip("/")
    url = url.removesuffix("/v1")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a worker URL looks like http://host:port, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # (parsed lazily: an out-of-range or non-numeric port raises here)
    except ValueError as e:  # "Port out of range 0-65535", "Invalid IPv6 URL"
        raise ValueError(f"a worker URL looks like http://host:port, got {url!r}: {e}") from None
    host = parts.hostname
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"a worker URL looks like http://host:port, got {url!r}: no valid host")
    if port == 0:
        raise ValueError(f"a worker URL's port must be from 1 to 65535, got {url!r}")
    return url
