"""``tokenmill keys``: the gateway's API keys, straight in its ledger (the gateway may be running).

tokenmill keys create --team search --config gateway.yaml     # prints the key, once
tokenmill keys list --config gateway.yaml [--team search]
tokenmill keys revoke key_0123456789ab --config gateway.yaml
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway

err = Console(stderr=True)
out = Console()
app = typer.Typer(help="Create, list and revoke the gateway's API keys.")

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The gateway's YAML config (it names the ledger).")
]


def _gateway(config: Path) -> Gateway:
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.gateway_config import GatewayConfigError, load_gateway_config

    try:
        return Gateway(load_gateway_config(config))
    except (OSError, GatewayConfigError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def create(
    team: Annotated[str, typer.Option(help="The team the key belongs to.")],
    config: ConfigOption,
    label: Annotated[str | None, typer.Option(help="A note: who or what uses the key.")] = None,
) -> None:
    """A new key for a team. It is shown this once: the ledger keeps only its hash."""
    gateway = _gateway(config)
    if team not in gateway.teams:
        known = ", ".join(sorted(gateway.teams)) or "none"
        err.print(f"[red]error:[/red] --team must name a team of the config or the admin API ({known})")
        raise typer.Exit(2)
    key, record = gateway.create_key(team, label)
    err.print(f"key {record.id} for team {team} (shown once; keep it secret):", highlight=False)
    print(key)


@app.command("list")
def list_keys(
    config: ConfigOption, team: Annotated[str | None, typer.Option(help="Only this team's keys.")] = None
) -> None:
    """Every key: id, team, label, created, revoked (never the key itself)."""
    from rich.table import Table

    table = Table()
    for col in ("id", "team", "label", "created", "revoked"):
        table.add_column(col)
    for k in _gateway(config).ledger.keys(team):
        table.add_row(k.id, k.team, k.label or "", _when(k.created), _when(k.revoked) if k.revoked else "")
    out.print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], config: ConfigOption
) -> None:
    """Stop a key working (a running gateway notices within two seconds)."""
    record = _gateway(config).revoke_key(key_id)
    if record is None:
        err.print(f"[red]error:[/red] no key {key_id!r}")
        raise typer.Exit(2)
    err.print(f"key {key_id} of team {record.team} revoked")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
