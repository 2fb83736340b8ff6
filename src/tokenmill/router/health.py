"""Keeping the router's fleet current: health checks, the workers' own metrics, the workers file.

Every ``interval`` seconds each worker's ``/health`` is checked (the pool
ejects after repeated failures and re-admits on a ramp; a worker back from an
outage has lost its cache, so the router forgets what it held), its
``/metrics`` read (its prefill speed and measured cache hits,
``router/calibration.py``) and its ``/v1/models`` (the models it serves, so
requests naming another go elsewhere: read every round, since a worker may
restart with another model between two checks); the workers file, when given, is re-read if it
changed: new workers join, dropped ones drain and leave once idle. With the
``kv`` policy the keeper also keeps one KV event subscription per worker.

Nothing one worker does may stop the loop that checks all of them: a check
that fails in a way nobody foresaw is logged and counted as that worker's
failed check, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.client import HTTPTransport, TransportError
from tokenmill.router.calibration import WorkerCounters, parse_counters
from tokenmill.router.kv_subscriber import KVSubscriptions
from tokenmill.router.policies import Router
from tokenmill.router.workers import Worker, WorkerPool, normalize, parse_worker

logger = logging.getLogger(__name__)
WORKER_HEADER = "x-tokenmill-worker"


class FleetKeeper:
    def __init__(
        self,
        pool: WorkerPool,
        router: Router,
        transport: Callable[[Worker], HTTPTransport],
        interval: float,
        workers_file: Path | None = None,
        after_round: Callable[[], None] | None = None,
    ) -> None:
        """``after_round``: called after every round of checks (the workers may have changed)."""
        self.pool = pool
        self.after_round = after_round
        self.router = router
        self.transport = transport
        self.interval = interval
        self.workers_file = workers_file
        self._file_stamp: float | None = workers_file.stat().st_mtime if workers_file else None
        self._leaving: set[str] = set()  # dropped from the file: drained, removed once idle
        self.kv_events = KVSubscriptions(router.kv, transport) if router.policy == "kv" else None
        self._broken: set[str] = set()  # workers whose check raised: logged in full once, then briefly
        self._not_finite: set[str] = set()  # workers whose /metrics had NaN or inf (warned once)

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    self.reload_workers_file()
                    if self.kv_events is not None:
                        self.kv_events.sync(self.pool.workers)
                except Exception:  # the checks below must still run
                    logger.exception("the router could not update its fleet; checking the workers it has")
                await asyncio.gather(*(self.check_safely(w) for w in self.pool.workers))
                if self.after_round is not None:
                    try:
                        self.after_round()
                    except Exception:
                        logger.exception("the router failed to act on its fleet's health")
                await asyncio.sleep(self.interval)
        finally:
            if self.kv_events is not None:
                await self.kv_events.close()

    async def check_safely(self, w: Worker) -> None:
        """``check``, with whatever it raises that nobody foresaw counted as a failed check of
        ``w`` alone: one worker (a URL, its /metrics) must never stop the checks of the others."""
        try:
            await self.check(w)
        except Exception as e:
            if w.url in self._broken:
                logger.debug("the health check of %s failed again: %r", w.url, e)
            else:
                self._broken.add(w.url)
                logger.exception("the health check of %s failed; counted as a failed check", w.url)
            self.pool.health(w, False)
        else:
            self._broken.discard(w.url)

    def reload_workers_file(self) -> None:
        """Workers new in the file join (on the ramp); workers gone from it drain, then leave."""
        for url in list(self._leaving):
            w = next((x for x in self.pool.workers if x.url == url), None)
            if w is None or w.in_flight == 0:
                if w is not None:
                    self.router.forget(self.pool.remove(url).url)
                self._leaving.discard(url)
        if self.workers_file is None:
            return
        try:
            stamp = self.workers_file.stat().st_mtime
            if stamp == self._file_stamp:
                return
            wanted = set(read_workers_file(self.workers_file))
        except (OSError, ValueError) as e:
            logger.warning("cannot re-read %s: %s; keeping the workers as they are", self.workers_file, e)
            return
        self._file_stamp = stamp
        for spec in wanted:
            url = self.pool.add(spec).url
            self._leaving.discard(url)
        urls = {normalize(spec) for spec in wanted}
        for w in self.pool.workers:
            if w.url not in urls:
                self.pool.drain(w.url)
                self._leaving.add(w.url)
        logger.warning("workers file re-read: %d workers", len(wanted))

    async def check(self, w: Worker) -> None:
        try:
            response = await asyncio.wait_for(self.transport(w).request("GET", "/health"), timeout=2.0)
            ok = response.status == 200
            if ok and w.name == w.url:
                w.name = response.headers.get(WORKER_HEADER, w.url)
        except (TransportError, TimeoutError):
            ok = False
        was_healthy = w.healthy
        self.pool.health(w, ok)
        if w.healthy and not was_healthy:  # back from an outage: whatever it had cached may be gone
            self.router.forget(w.url)
            w.step_cost.reset()
        if ok:
            await asyncio.gather(self.scrape(w), self.learn_models(w))

    async def scrape(self, w: Worker) -> None:
        """The worker's step and cache counters, if it exports them."""
        try:
            response = await asyncio.wait_for(self.transport(w).request("GET", "/metrics"), timeout=2.0)
        except (TransportError, TimeoutError):
            return
        if response.status != 200:
            return
        counters = parse_counters(response.text)
        finite = _finite(counters)
        if finite is not counters and w.url not in self._not_finite:
            self._not_finite.add(w.url)
            logger.warning("%s exports NaN or infinite values in /metrics; they are ignored", w.url)
        w.counters = finite
        if finite is counters:  # (a NaN step counter would poison the fit for its whole window)
            w.step_cost.observe(counters)
        limit = finite.concurrency_limit
        if limit is not None and limit >= 1:
            self.pool.set_slots(w, int(limit))
        w.engine = finite.engine or w.engine

    async def learn_models(self, w: Worker) -> None:
        """The model ids the worker's /v1/models lists; not known (any model goes there) if it
        lists none or answers something else; as they were if it cannot be reached just now."""
        try:
            response = await asyncio.wait_for(self.transport(w).request("GET", "/v1/models"), timeout=2.0)
        except (TransportError, TimeoutError):
            return
        try:
            listing = response.json() if response.status == 200 else None
        except (ValueError, RecursionError):  # not JSON (or absurdly nested)
            listing = None
        self.pool.set_models(w, _model_ids(listing))


def _model_ids(listing: Any) -> frozenset[str] | None:
    """The ids of an OpenAI model list (``{"data": [{"id": ...}, ...]}``); None if it is none."""
    data = listing.get("data") if isinstance(listing, dict) else None
    ids = frozenset(m["id"] for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str))
    return ids if isinstance(data, list) and ids else None


def _finite(counters: WorkerCounters) -> WorkerCounters:
    """``counters`` with every NaN or infinite value dropped (to its field's default), or the same
    object when every value is finite."""
    bad = {
        f.name: f.default
        for f in dataclasses.fields(counters)
        if isinstance(value := getattr(counters, f.name), float) and not math.isfinite(value)
    }
    return dataclasses.replace(counters, **bad) if bad else counters


def read_workers_file(path: Path) -> list[str]:
    """Worker URLs, one per line, each optionally labelled with its pool (``URL#latency``); blank
    lines and lines starting with # are skipped."""
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            url, pool = parse_worker(line)
            specs.append(f"{url}#{pool}" if pool else url)
    return specs
