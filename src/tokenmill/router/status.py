"""What `tokenmill route status` and `GET /status` show: the policy, its decisions, queues and each worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.health import FleetKeeper
    from tokenmill.router.policies import Router
    from tokenmill.router.workers import WorkerPool


def fleet_status(
    router: Router, pool: WorkerPool, keeper: FleetKeeper, gateway: Gateway | None, streams_cut: int
) -> dict[str, Any]:
    return {
        "policy": router.policy,
        "imbalance": pool.imbalance(),
        "decisions": dict(router.decisions),
        "predicted_hit_tokens": router.predicted_hit_tokens,
        "streams_cut": streams_cut,
        "queues": {
            pool: {
                "in_flight": q.in_flight,
                "waiting": q.waiting,
                "refused": q.refused,
                "admitted_by_team": dict(q.admitted_by_team),
            }
            for pool, q in (gateway.queues if gateway else {}).items()
        },
        "workers": [
            {
                "url": w.url,
                "name": w.name,
                "pool": w.pool,
                "slots": w.slots,
                "models": sorted(w.models) if w.models is not None else None,  # None: not known yet
                "healthy": w.healthy,
                "draining": w.draining,
                "in_flight": w.in_flight,
                "in_flight_tokens": w.in_flight_tokens,
                "in_flight_sequences": w.in_flight_sequences,
                "routed": w.routed,
                "routed_tokens": w.routed_tokens,
                "failed": w.failed,
                "predicted_hit_tokens": w.predicted_hit_tokens,
                "measured_hit_rate": w.measured_hit_rate,
                "prefill_tokens_per_s": 1 / w.step_cost.seconds_per_token
                if w.step_cost.seconds_per_token
                else None,
                "kv_blocks_known": router.kv.num_blocks(w.url),
                "kv_events": keeper.kv_events is not None and w.url in keeper.kv_events.connected,
            }
            for w in pool.workers
        ],
    }
