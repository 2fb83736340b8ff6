"""The gateway's configuration: teams, their limits, prices, where usage is kept (a YAML file).

```yaml
ledger: /var/lib/tokenmill/usage.db     # SQLite; default: tokenmill-gateway.db beside this file
admin_key_env: TOKENMILL_ADMIN_KEY      # the environment variable holding the admin key
default_max_tokens: 1024                # reserved for a request that names no max_tokens
worker_slots: 64                        # requests a worker runs at once, if its /metrics does not say
queue: {max_waiting: 1000, max_wait_s: 30, aging_s: 5, fair: true, overflow: 0.125}  # admission.py
                                        # (overflow: a share of the slots, 0 to 1)
usage_checkpoint_s: 5                   # a running stream's usage row is brought up to date this often
prices:                                 # dollars per million tokens, per model
  llama-3-8b: {prompt: 0.05, completion: 0.20}
teams:
  search:                               # letters, digits, - _ . (1-64, a letter or digit first)
    models: [llama-3-8b]                # or ["*"]
    priority: 10                        # higher first (int32); a request may lower it, never raise it
    requests_per_minute: 600
    tokens_per_minute: 200000           # prompt + max_tokens reserved at admission
    max_parallel: 32
    budget: {tokens: 100000000, period: month}   # or {dollars: 50, period: day}
    pool: latency                       # latency or throughput
    weight: 1                           # share against teams of the same priority when workers are full
```

Counts (limits, budgets, slots) are whole numbers from 1 to 2^53-1, the
largest the limiter's buckets (floats) and JSON readers hold exactly;
priorities are int32, as workers (gRPC) and the ledger keep them.

Teams created or changed through ``/admin/teams`` are kept in the ledger and
survive restarts; this file is applied at every start: a team it names is set
from it (the file wins: one deleted through the API returns at the next start
unless it is removed here), and a team it named before and no longer does is
removed, its keys revoked. Every error names the field and what it allows
(``GatewayConfigError.field``, the admin API's ``param``).
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.protocol.headers import PRIORITY_MAX, PRIORITY_MIN
from tokenmill.protocol.shown import shown
from tokenmill.protocol.text import utf8_encodable
from tokenmill.router.config_yaml import ConfigYAMLError, load_config_yaml

PERIODS = ("day", "week", "month")
POOLS = ("latency", "throughput")
COUNT_MAX = 2**53 - 1  # limits and budgets: the limiter's buckets are floats, exact up to here
NUMBER_MAX = 1e15  # prices, dollars, seconds: past this, costs overflow to inf, which JSON cannot carry
WEIGHT_MAX = 1e6
LABEL_MAX = 256  # characters of a key's label
# Team names go in URLs (DELETE /admin/teams/{name}) and in the ledger: nothing a URL or a path
# would split or normalize ("a/b", "..", "%2F"), and only what UTF-8 and a terminal show plainly.
TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TEAM_NAME_RULE = "1-64 characters from A-Z a-z 0-9 - _ . starting with a letter or digit"


class GatewayConfigError(ValueError):
    """The gateway config (or an admin request) has a field out of range; ``field`` names it
    (dotted: ``teams.search.priority``, or ``priority`` in an admin request)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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
    max_waiting: int = 1000  # waiting in the admission queue, every priority band together
    max_wait_s: float = 30.0  # in the admission queue, then 429
    aging_s: float = 5.0  # a waiting band's standing rises by one per this many seconds
    fair_queuing: bool = True  # between teams of one band; false: first come, first served
    overflow: float = 0.125  # share of slots that requests outranking all that wait may take past full
    usage_checkpoint_s: float = 5.0  # a running stream's row gets its completion so far this often
    prices: dict[str, Price] = field(default_factory=dict)
    teams: dict[str, Team] = field(default_factory=dict)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model) or self.prices.get("*")


def load_gateway_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise GatewayConfigError(f"cannot read the gateway config {path}: {why}") from None
    try:
        raw = load_config_yaml(text) or {}
    except ConfigYAMLError as e:
        raise GatewayConfigError(f"{path} is not valid YAML: {e}") from None
    config = parse_gateway_config(raw, path.parent)
    check_ledger_path(config.ledger)
    return config


def parse_gateway_config(raw: Any, base: Path) -> GatewayConfig:
    data = _mapping(raw, "the gateway config")
    _known(data, _TOP_FIELDS, "the gateway config")
    ledger = data.get("ledger", "tokenmill-gateway.db")
    if not isinstance(ledger, str) or not ledger.strip() or "\x00" in ledger:
        raise GatewayConfigError(
            "ledger must be the SQLite file's path, e.g. usage.db (relative: beside the config; "
            f"absent: tokenmill-gateway.db), got {shown(ledger)}",
            "ledger",
        )
    prices = {}
    for model, p in _mapping(data.get("prices") or {}, "prices").items():
        p = _mapping(p, f"prices.{model}")
        _known(p, {"prompt", "completion"}, f"prices.{model}")
        prices[model] = Price(
            _number(p.get("prompt", 0.0), f"prices.{model}.prompt"),
            _number(p.get("completion", 0.0), f"prices.{model}.completion"),
        )
    teams = {}
    for name, t in _mapping(data.get("teams") or {}, "teams").items():
        teams[name] = parse_team(name, t)
    admin_env = data.get("admin_key_env", "TOKENMILL_ADMIN_KEY")
    if not isinstance(admin_env, str) or not admin_env:
        raise GatewayConfigError(
            f"admin_key_env must be an environment variable's name, got {shown(admin_env)}", "admin_key_env"
        )
    default_max_tokens = _count(data, "default_max_tokens", 1024)
    worker_slots = _count(data, "worker_slots", 64)
    queue = _mapping(data.get("queue") or {}, "queue")
    _known(queue, {"max_waiting", "max_wait_s", "aging_s", "fair", "overflow"}, "queue")
    overflow = _number(queue.get("overflow", 0.125), "queue.overflow", most=1.0)
    fair = queue.get("fair", True)
    if not isinstance(fair, bool):
        raise GatewayConfigError(f"queue.fair must be true or false, got {shown(fair)}", "queue.fair")
    max_waiting = _count(queue, "max_waiting", 1000, "queue.")
    max_wait_s = _number(queue.get("max_wait_s", 30.0), "queue.max_wait_s")
    aging_s = _number(queue.get("aging_s", 5.0), "queue.aging_s")
    if aging_s <= 0:
        raise GatewayConfigError(f"queue.aging_s must be > 0, got {aging_s}", "queue.aging_s")
    usage_checkpoint_s = _number(data.get("usage_checkpoint_s", 5.0), "usage_checkpoint_s", most=3600.0)
    if usage_checkpoint_s <= 0:
        raise GatewayConfigError(
            f"usage_checkpoint_s must be > 0 (seconds, at most 3600), got {usage_checkpoint_s}",
            "usage_checkpoint_s",
        )
    path = Path(ledger).expanduser()
    return GatewayConfig(
        path if path.is_absolute() else base / path,
        admin_env,
        default_max_tokens,
        worker_slots,
        max_waiting,
        max_wait_s,
        aging_s,
        fair,
        overflow,
        usage_checkpoint_s,
        prices,
        teams,
    )


def check_ledger_path(path: Path) -> None:
    """What can be told before SQLite opens it: the ledger is a file, or can be made one."""
    if path.is_dir():
        raise GatewayConfigError(
            f"ledger must be a file, not a folder: {path} is a folder (name a file in it, e.g. "
            f"{path / 'usage.db'})",
            "ledger",
        )
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise GatewayConfigError(
                    f"ledger {path} cannot be made: {folder} is a file, not a folder", "ledger"
                )
            return


_TOP_FIELDS = {
    "ledger",
    "admin_key_env",
    "default_max_tokens",
    "worker_slots",
    "queue",
    "usage_checkpoint_s",
    "prices",
    "teams",
}


TEAM_FIELDS = frozenset(
    {
        "models",
        "priority",
        "requests_per_minute",
        "tokens_per_minute",
        "max_parallel",
        "budget",
        "pool",
        "weight",
    }
)


def parse_team(name: str, raw: Any, where: str | None = None) -> Team:
    """A team from its config mapping (the YAML's, or an admin request's body). ``where``: what
    errors call its fields' parent (``teams.NAME`` by default; "" for an admin request's body)."""
    if not isinstance(name, str) or not TEAM_NAME.fullmatch(name):
        if where == "":
            raise GatewayConfigError(f"name must be {TEAM_NAME_RULE}, got {shown(name)}", "name")
        raise GatewayConfigError(f"teams: the team name {name!r} must be {TEAM_NAME_RULE}", "teams")
    where = f"teams.{name}" if where is None else where
    t = _mapping(raw or {}, where or "the body")
    _known(t, TEAM_FIELDS, where or "the body")
    models = t.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise GatewayConfigError(
            f"{_at(where, 'models')} must be a list of model names (or ['*']), got {shown(models)}",
            _at(where, "models"),
        )
    for m in models:
        _text(m, _at(where, "models"))
    priority = t.get("priority", 0)
    if isinstance(priority, float) and priority.is_integer():  # (10.0, as the limits take it)
        priority = int(priority)
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not PRIORITY_MIN <= priority <= PRIORITY_MAX
    ):
        raise GatewayConfigError(
            f"{_at(where, 'priority')} must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} "
            f"(higher first), got {shown(priority)}",
            _at(where, "priority"),
        )
    pool = t.get("pool", "throughput")
    if pool not in POOLS:
        raise GatewayConfigError(
            f"{_at(where, 'pool')} must be one of {', '.join(POOLS)}, got {shown(pool)}", _at(where, "pool")
        )
    weight = t.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= WEIGHT_MAX:
        raise GatewayConfigError(
            f"{_at(where, 'weight')} must be a number > 0 and <= {WEIGHT_MAX:.0f} (its fair share), "
            f"got {shown(weight)}",
            _at(where, "weight"),
        )
    return Team(
        name=name,
        weight=float(weight),
        models=tuple(models),
        priority=priority,
        requests_per_minute=_limit(t.get("requests_per_minute"), _at(where, "requests_per_minute")),
        tokens_per_minute=_limit(t.get("tokens_per_minute"), _at(where, "tokens_per_minute")),
        max_parallel=_limit(t.get("max_parallel"), _at(where, "max_parallel")),
        budget=_budget(t.get("budget"), _at(where, "budget")),
        pool=pool,
    )


def parse_label(value: Any) -> str | None:
    """A key's label (a note: who or what uses it), as the ledger can keep it and a table show it."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > LABEL_MAX:
        got = f"{len(value)} characters" if isinstance(value, str) else repr(value)
        raise GatewayConfigError(
            f"label must be a string of at most {LABEL_MAX} characters, got {got}", "label"
        )
    if any(unicodedata.category(c) == "Cc" for c in value):  # tables print it: no escape codes
        raise GatewayConfigError(
            "label must be printable text: no control characters (newlines, tabs, escapes)", "label"
        )
    return _text(value, "label")


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _text(value: str, where: str) -> str:
    """Text the ledger (SQLite, UTF-8) can hold."""
    if not utf8_encodable(value):
        raise GatewayConfigError(
            f"{where} must be text UTF-8 can hold: it has an unpaired \\uD800-\\uDFFF escape", where
        )
    return value


def _budget(raw: Any, where: str) -> Budget | None:
    if raw is None:
        return None
    b = _mapping(raw, where)
    _known(b, {"tokens", "dollars", "period"}, where)
    period = b.get("period", "month")
    if period not in PERIODS:
        raise GatewayConfigError(
            f"{where}.period must be one of {', '.join(PERIODS)}, got {shown(period)}", f"{where}.period"
        )
    tokens = _limit(b.get("tokens"), f"{where}.tokens")
    dollars = b.get("dollars")
    if dollars is not None:
        dollars = _number(dollars, f"{where}.dollars")
    if (tokens is None) == (dollars is None):
        raise GatewayConfigError(f"{where} takes one of tokens or dollars, got {shown(raw)}", where)
    return Budget(period, tokens, dollars)


def _limit(value: Any, where: str, absent: str = "no limit") -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= COUNT_MAX:
        raise GatewayConfigError(
            f"{where} must be a whole number from 1 to {COUNT_MAX} (or absent: {absent}), got {shown(value)}",
            where,
        )
    return value


def _count(data: dict[str, Any], name: str, default: int, prefix: str = "") -> int:
    """A count with a default: present but empty (``name:`` in YAML) is a mistake, not the default."""
    value = data.get(name, default)
    count = _limit(value if value is not None else "nothing", prefix + name, absent=str(default))
    assert count is not None
    return count


def _number(value: Any, where: str, most: float = NUMBER_MAX) -> float:
    number = None
    if not isinstance(value, bool) and isinstance(value, int | float):
        with contextlib.suppress(OverflowError):  # (an int past 1.8e308 does not convert)
            number = float(value)
    if number is None or not 0 <= number <= most:  # (False for NaN)
        raise GatewayConfigError(f"{where} must be a number from 0 to {most:g}, got {shown(value)}", where)
    return number


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GatewayConfigError(f"{where} must be a mapping, got {type(value).__name__}", where)
    return value


def _known(value: dict[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    """Unknown fields are refused, not ignored: a misspelt limit would otherwise be no limit."""
    unknown = sorted(str(k) for k in set(value) - allowed)
    if unknown:
        top = where in ("the body", "the gateway config")
        raise GatewayConfigError(
            f"{where} has unknown fields {unknown}: allowed {sorted(allowed)}",
            unknown[0] if top else f"{where}.{unknown[0]}",
        )
