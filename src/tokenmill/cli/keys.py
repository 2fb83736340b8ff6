"""``tokenmill keys``: the gateway's API keys, straight in its ledger (the gateway may be running).

tokenmill keys create --team search --config gateway.yaml     # prints the key, once
tokenmill keys create --team search --config gateway.yaml --expires-in-s 86400   # works for a day
tokenmill keys list --config gateway.yaml [--team search]
tokenmill keys revoke key_0123456789ab --config gateway.yaml
tokenmill keys rotate key_0123456789ab --config gateway.yaml --grace-s 3600   # prints the new key
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tokenmill.router.api_keys import MAX_EXPIRES_IN_S, MAX_GRACE_S

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway

err = Console(stderr=True)
out = Console()
app = typer.Typer(help="Create, list, revoke and rotate the gateway's API keys.")

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The gateway's YAML config (it names the ledger).")
]


def _gateway(config: Path) -> Gateway:
    from tokenmill.cli.route import open_gateway
    from tokenmill.router.gateway_config import load_gateway_config

    try:
        return open_gateway(load_gateway_config(config), starting=False)  # (changes no team)
    except (OSError, ValueError) as e:  # (GatewayConfigError is a ValueError)
        _fail(str(e))


@app.command()
def create(
    team: Annotated[str, typer.Option(help="The team the key belongs to.")],
    config: ConfigOption,
    label: Annotated[str | None, typer.Option(help="A note: who or what uses the key.")] = None,
    expires_in_s: Annotated[
        float | None,
        typer.Option(
            "--expires-in-s",
            min=0,
            max=MAX_EXPIRES_IN_S,
            help="Seconds the key works, at most 10 years (without: until revoked).",
        ),
    ] = None,
) -> None:
    """A new key for a team. It is shown this once: the ledger keeps only its hash."""
    from tokenmill.router.gateway_config import GatewayConfigError, parse_label

    gateway = _gateway(config)
    if team not in gateway.teams:
        known = ", ".join(sorted(gateway.teams)) or "none"
        _fail(f"--team must name a team of the config or the admin API ({known}), got {team!r}")
    try:
        label = parse_label(label)
    except GatewayConfigError as e:
        _fail(f"--{e}")
    if expires_in_s == 0:
        _fail("--expires-in-s must be above 0 (without it, the key works until revoked)")
    key, record = gateway.create_key(team, label, expires_in_s)
    until = f", expires {_when(record.expires)}" if record.expires is not None else ""
    err.print(
        f"key {record.id} for team {team}{until} (shown once; keep it secret):",
        highlight=False,
        soft_wrap=True,
    )
    print(key)


@app.command("list")
def list_keys(
    config: ConfigOption, team: Annotated[str | None, typer.Option(help="Only this team's keys.")] = None
) -> None:
    """Every key: id (a rotated one's replacement under it), team, label, created, revoked, expires
    (never the key itself)."""
    from rich.table import Table
    from rich.text import Text

    keys = _gateway(config).ledger.keys(team)
    # `keys revoke` takes the whole id: its column never shrinks or wraps (the others fold to make
    # room, even in 80 columns or a pipe), and cells are text, never Rich markup (a label "[x]").
    table = Table()
    # A rotated key's replacement goes under its id, whole, in the column that never wraps.
    ids = [k.id if k.replaced_by is None else f"{k.id}\n-> {k.replaced_by}" for k in keys]
    width = max((len(line) for i in ids for line in i.splitlines()), default=2)
    table.add_column("id", no_wrap=True, min_width=width)
    for col in ("team", "label", "created", "revoked", "expires"):
        table.add_column(col, overflow="fold")
    for k, key_id in zip(keys, ids, strict=True):
        label = _printable(k.label or "")  # (labels older than the check may hold escape codes)
        revoked = "" if k.revoked is None else _when(k.revoked)
        if k.revoked is not None and k.active():
            revoked += " (rotated: works until then)"
        elif k.replaced_by is not None:
            revoked += " (rotated)"
        expires = "" if k.expires is None else _when(k.expires)
        cells = (key_id, k.team, label, _when(k.created), revoked, expires)
        table.add_row(*(Text(c) for c in cells))
    out.print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], config: ConfigOption
) -> None:
    """Stop a key working (a running gateway notices within two seconds)."""
    record = _gateway(config).revoke_key(key_id)
    if record is None:
        _fail(f"no key {key_id!r}")
    err.print(f"key {key_id} of team {record.team} revoked", highlight=False, markup=False)


@app.command()
def rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")],
    config: ConfigOption,
    grace_s: Annotated[
        float,
        typer.Option(
            "--grace-s",
            min=0,
            max=MAX_GRACE_S,
            help="Seconds the old key keeps working, so its clients move to the new one without a "
            "refused request (at most 30 days; 0: it stops now).",
        ),
    ] = 0.0,
) -> None:
    """A new key in place of an old one, which stops working now or after --grace-s.

    The new key has the old one's team and label, and is printed once. A running gateway notices
    within two seconds."""
    from tokenmill.router.gateway_request import GatewayError

    try:
        key, record, stops = _gateway(config).rotate_key(key_id, grace_s)
    except GatewayError as e:
        _fail(e.message)
    left = stops - time.time()  # the grace, or less where the key expires sooner
    until = f"in {left:.0f} s (at {_when(stops)})" if left > 0.5 else "now"
    err.print(
        f"key {record.id} for team {record.team} replaces {key_id}, which stops working {until} "
        "(the new key is shown once; keep it secret):",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    print(key)


def _fail(message: str) -> NoReturn:
    """One line on stderr (never wrapped, never read as markup), and exit status 2."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _printable(text: str) -> str:
    """Control characters shown as escapes (``\\x1b``), not sent to the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
