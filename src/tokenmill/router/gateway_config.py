"""The gateway's configuration: teams, their limits, prices, where usage is kept (a YAML file).

```yaml
ledger: /var/lib/tokenmill/usage.db     # SQLite; default: tokenmill-gateway.db beside this file
admin_key_env: TOKENMILL_ADMIN_KEY      # the environment variable holding the admin key
default_max_tokens: 1024                # reserved for a request that names no max_tokens
worker_slots: 64                        # requests a worker runs at once, if its /metrics does not say
queue: {max_waiting: 1000, max_wait_s: 30, aging_s: 5, fair: true, overflow: 0.125}  # admission.py
prices:                                 # dollars per million tokens, per model
  llama-3-8b: {prompt: 0.05, completion: 0.20}
teams:
  search:
    models: [llama-3-8b]                # or ["*"]
    priority: 10                        # higher first; a request may lower it, never raise it
    requests_per_minute: 600
    tokens_per_minute: 200000           # prompt + max_tokens reserved at admission
    max_parallel: 32
    budget: {tokens: 100000000, period: month}   # or {dollars: 50, period: day}
    pool: latency                       # latency or throughput
    weight: 1                           # share against teams of the same priority when workers are full
```

Teams created or changed through ``/admin/teams`` are kept in the ledger and
survive restarts; a team named in this file is set from it at every start
(the file wins for the teams it names). Every error names the field and what
it allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERIODS = ("day", "week", "month")
POOLS = ("latency", "throughput")


class GatewayConfigError(ValueError):
    """The gateway config (or an admin request) has a field out of range."""


@dataclass(frozen=True)
class Budget:
    period: str  # day, week or month (UTC calendar periods)
    tokens: int | None = None
    dollars: float | None = None


@dataclass(frozen=True)
class Team:
    name: str
    models: tuple[str, ...] = ("*",)
    priority: int = 0
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None
    budget: Budget | None = None
    pool: str = "throughput"
    weight: float = 1.0  # its share against other teams of its priority when workers are full

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["models"] = list(self.models)
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Price:
    prompt: float  # dollars per million prompt tokens
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


@dataclass(frozen=True)
class GatewayConfig:
    ledger: Path
    admin_key_env: str = "TOKENMILL_ADMIN_KEY"
    default_max_tokens: int = 1024  # reserved for a request that names no max_tokens
    worker_slots: int = 64  # requests a worker runs at once, when its /metrics does not say
    max_waiting: int = 1000  # per priority band of the admission queue
    max_wait_s: float = 30.0  # in the admission queue, then 429
    aging_s: float = 5.0  # a waiting band's standing rises by one per this many seconds
    fair_queuing: bool = True  # between teams of one band; false: first come, first served
    overflow: float = 0.125  # share of slots that requests outranking all that wait may take past full
    prices: dict[str, Price] = field(default_factory=dict)
    teams: dict[str, Team] = field(default_factory=dict)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model) or self.prices.get("*")


def load_gateway_config(path: Path) -> GatewayConfig:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise GatewayConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_gateway_config(raw, path.parent)


def parse_gateway_config(raw: Any, base: Path) -> GatewayConfig:
    data = _mapping(raw, "the gateway config")
    _known(data, _TOP_FIELDS, "the gateway config")
    ledger = Path(str(data.get("ledger", "tokenmill-gateway.db")))
    prices = {}
    for model, p in _mapping(data.get("prices") or {}, "prices").items():
        p = _mapping(p, f"prices.{model}")
        _known(p, {"prompt", "completion"}, f"prices.{model}")
        prices[str(model)] = Price(
            _number(p.get("prompt", 0.0), f"prices.{model}.prompt"),
            _number(p.get("completion", 0.0), f"prices.{model}.completion"),
        )
    teams = {}
    for name, t in _mapping(data.get("teams") or {}, "teams").items():
        teams[str(name)] = parse_team(str(name), t)
    admin_env = data.get("admin_key_env", "TOKENMILL_ADMIN_KEY")
    if not isinstance(admin_env, str) or not admin_env:
        raise GatewayConfigError(f"admin_key_env must be an environment variable's name, got {admin_env!r}")
    default_max_tokens = _limit(data.get("default_max_tokens", 1024), "default_max_tokens")
    worker_slots = _limit(data.get("worker_slots", 64), "worker_slots")
    queue = _mapping(data.get("queue") or {}, "queue")
    _known(queue, {"max_waiting", "max_wait_s", "aging_s", "fair", "overflow"}, "queue")
    overflow = _number(queue.get("overflow", 0.125), "queue.overflow")
    fair = queue.get("fair", True)
    if not isinstance(fair, bool):
        raise GatewayConfigError(f"queue.fair must be true or false, got {fair!r}")
    max_waiting = _limit(queue.get("max_waiting", 1000), "queue.max_waiting")
    max_wait_s = _number(queue.get("max_wait_s", 30.0), "queue.max_wait_s")
    aging_s = _number(queue.get("aging_s", 5.0), "queue.aging_s")
    if aging_s <= 0:
        raise GatewayConfigError(f"queue.aging_s must be > 0, got {aging_s}")
    assert default_max_tokens is not None and worker_slots is not None and max_waiting is not None
    ledger = ledger if ledger.is_absolute() else base / ledger
    return GatewayConfig(
        ledger,
        admin_env,
        default_max_tokens,
        worker_slots,
        max_waiting,
        max_wait_s,
        aging_s,
        fair,
        overflow,
        prices,
        teams,
    )


_TOP_FIELDS = {"ledger", "admin_key_env", "default_max_tokens", "worker_slots", "queue", "prices", "teams"}


_TEAM_FIELDS = {
    "models",
    "priority",
    "requests_per_minute",
    "tokens_per_minute",
    "max_parallel",
    "budget",
    "pool",
    "weight",
}


def parse_team(name: str, raw: Any) -> Team:
    """A team from its config mapping (the YAML's, or an admin request's body)."""
    if not name or not isinstance(name, str) or len(name) > 64:
        raise GatewayConfigError(f"a team's name is 1-64 characters, got {name!r}")
    where = f"teams.{name}"
    t = _mapping(raw or {}, where)
    _known(t, _TEAM_FIELDS, where)
    models = t.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise GatewayConfigError(f"{where}.models must be a list of model names (or ['*']), got {models!r}")
    priority = t.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise GatewayConfigError(f"{where}.priority must be an integer (higher first), got {priority!r}")
    pool = t.get("pool", "throughput")
    if pool not in POOLS:
        raise GatewayConfigError(f"{where}.pool must be one of {', '.join(POOLS)}, got {pool!r}")
    weight = t.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise GatewayConfigError(f"{where}.weight must be a number > 0 (its fair share), got {weight!r}")
    return Team(
        name=name,
        weight=float(weight),
        models=tuple(models),
        priority=priority,
        requests_per_minute=_limit(t.get("requests_per_minute"), f"{where}.requests_per_minute"),
        tokens_per_minute=_limit(t.get("tokens_per_minute"), f"{where}.tokens_per_minute"),
        max_parallel=_limit(t.get("max_parallel"), f"{where}.max_parallel"),
        budget=_budget(t.get("budget"), f"{where}.budget"),
        pool=pool,
    )


def _budget(raw: Any, where: str) -> Budget | None:
    if raw is None:
        return None
    b = _mapping(raw, where)
    _known(b, {"tokens", "dollars", "period"}, where)
    period = b.get("period", "month")
    if period not in PERIODS:
        raise GatewayConfigError(f"{where}.period must be one of {', '.join(PERIODS)}, got {period!r}")
    tokens = _limit(b.get("tokens"), f"{where}.tokens")
    dollars = b.get("dollars")
    if dollars is not None:
        dollars = _number(dollars, f"{where}.dollars")
    if (tokens is None) == (dollars is None):
        raise GatewayConfigError(f"{where} takes one of tokens or dollars, got {raw!r}")
    return Budget(period, tokens, dollars)


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GatewayConfigError(f"{where} must be a whole number >= 1 (or absent: no limit), got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise GatewayConfigError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GatewayConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _known(value: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise GatewayConfigError(f"{where} has unknown fields {unknown}: allowed {sorted(allowed)}")
