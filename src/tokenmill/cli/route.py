"""``tokenmill route``: one OpenAI endpoint in front of several workers.

tokenmill route --worker http://10.0.0.1:8000 --worker http://10.0.0.2:8000 --policy least_load
tokenmill route --workers-file workers.txt --port 9000
tokenmill route --workers-file workers.txt --policy kv --tokenizer /models/llama-3-8b-instruct
tokenmill route status http://127.0.0.1:9000   # behind a gateway: sends $TOKENMILL_ADMIN_KEY
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tokenmill.cli.event_loop import run_fast

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.gateway_config import GatewayConfig
    from tokenmill.router.policies import Router
    from tokenmill.router.prompt_blocks import PromptHasher
    from tokenmill.router.workers import WorkerPool

err = Console(stderr=True)
out = Console()
ADMIN_KEY_MIN = 16  # characters; shorter admin keys are warned about at start
app = typer.Typer(help="Route requests across workers (OpenAI API in, workers behind).")


@app.callback(invoke_without_command=True)
def route(
    ctx: typer.Context,
    worker: Annotated[list[str] | None, typer.Option(help="A worker's base URL (repeatable).")] = None,
    workers_file: Annotated[
        Path | None, typer.Option(help="A file of worker URLs, one per line; re-read when it changes.")
    ] = None,
    policy: Annotated[str, typer.Option(help="round_robin, least_load, prefix or kv.")] = "least_load",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="kv policy: the workers' model folder (its tokenizer and chat template), or 'demo'."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 9000,
    health_interval: Annotated[float, typer.Option(help="Seconds between active health checks.")] = 2.0,
    gateway_config: Annotated[
        Path | None,
        typer.Option(help="Serve as a gateway: teams, keys, limits and usage from this YAML file."),
    ] = None,
) -> None:
    """Serve the router (no subcommand), or run a subcommand."""
    if ctx.invoked_subcommand is not None:
        return
    from tokenmill.router.policies import Router
    from tokenmill.router.workers import WorkerPool

    try:
        from tokenmill.router.health import read_workers_file

        if not 0 <= port <= 65535:
            raise ValueError(f"--port must be from 0 to 65535 (0: any free port), got {port}")
        urls = list(worker or [])
        if workers_file is not None:
            urls += read_workers_file(workers_file)
        if not urls and workers_file is not None:
            raise ValueError(
                f"--workers-file {workers_file} lists no worker (one URL a line; blank lines and # "
                "comments are skipped): add one there, or give --worker URL"
            )
        if not urls:
            raise ValueError("give at least one --worker URL or a --workers-file")
        pool = WorkerPool(urls)
        router = Router(policy)
        if not health_interval > 0:
            raise ValueError(f"--health-interval must be > 0, got {health_interval}")
        hasher = _hasher(policy, tokenizer)
        gateway = _gateway(gateway_config) if gateway_config is not None else None
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # one line, however wide
        raise typer.Exit(2) from None
    try:
        run_fast(_serve(pool, router, host, port, health_interval, workers_file, hasher, gateway))
    except OSError as e:
        err.print(f"[red]error:[/red] cannot listen on {host}:{port}: {e.strerror or e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


def _hasher(policy: str, tokenizer: str | None) -> PromptHasher | None:
    """The kv policy's tokenizer: the workers' own, so block hashes match theirs."""
    if policy != "kv":
        if tokenizer is not None:
            raise ValueError(f"--tokenizer is used by --policy kv only (the policy is {policy})")
        return None
    if tokenizer is None:
        raise ValueError(
            "--policy kv needs --tokenizer: the workers' model folder, or 'demo' for the demo model"
        )
    import tokenmill.engine.tokenizer as tokenizer_module
    from tokenmill.engine.errors import ModelLoadError
    from tokenmill.router.prompt_blocks import PromptHasher

    folder = Path(tokenizer_module.__file__).parent / "demo_model" if tokenizer == "demo" else Path(tokenizer)
    try:
        return PromptHasher(tokenizer_module.Tokenizer(folder))
    except ModelLoadError as e:
        raise ValueError(f"--tokenizer: {e}") from None


def _gateway(path: Path) -> Gateway:
    """The gateway of the config at ``path``; ValueError naming the field (or the ledger) if not."""
    from tokenmill.router.gateway_config import load_gateway_config

    config = load_gateway_config(path)
    gateway = open_gateway(config)
    try:
        gateway.ledger.claim()  # one gateway per ledger: then what is in flight there is lost
        gateway.ledger.recover_interrupted()
    except (OSError, sqlite3.Error) as e:
        raise ValueError(f"ledger {config.ledger}: {getattr(e, 'strerror', None) or e}") from None
    if not gateway.is_configured_admin:
        err.print(
            f"[yellow]warning:[/yellow] ${config.admin_key_env} is not set (or blank): the admin API is "
            "closed (manage keys with `tokenmill keys`)"
        )
    elif len(os.environ[config.admin_key_env].strip()) < ADMIN_KEY_MIN:
        err.print(
            f"[yellow]warning:[/yellow] ${config.admin_key_env} is shorter than {ADMIN_KEY_MIN} characters: "
            "an admin key that short can be guessed (use e.g. `openssl rand -hex 32`)"
        )
    return gateway


def open_gateway(config: GatewayConfig, starting: bool = True) -> Gateway:
    """A gateway on the config's ledger (``starting``: see ``Gateway``); ValueError naming
    ``ledger`` when SQLite cannot open it (not a database, no permission, a disk error), for a
    one-line error instead of a traceback."""
    from tokenmill.router.gateway import Gateway

    try:
        return Gateway(config, starting=starting)
    except (OSError, sqlite3.Error) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ValueError(
            f"ledger {config.ledger} cannot be opened as the gateway's SQLite file: {why}"
        ) from None


async def _serve(
    pool: WorkerPool,
    router: Router,
    host: str,
    port: int,
    health_interval: float,
    workers_file: Path | None,
    hasher: PromptHasher | None = None,
    gateway: Gateway | None = None,
) -> None:
    from tokenmill.router.app import RouterApp
    from tokenmill.router.http_server import HTTPServer

    app = RouterApp(
        pool,
        router,
        health_interval=health_interval,
        workers_file=workers_file,
        hasher=hasher,
        gateway=gateway,
    )
    sock = listen_socket(host, port)
    server = HTTPServer(app, keep_alive_s=30)
    task = asyncio.create_task(server.serve(sock))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.02)
    bound = sock.getsockname()[1]
    what = f"{len(pool.workers)} workers; policy {router.policy}"
    if gateway is not None:
        what += f"; gateway: {len(gateway.teams)} teams, ledger {gateway.ledger.path}"
        if gateway.ledger.recovered:
            left = gateway.ledger.recovered
            what += f" ({left} requests a stopped gateway left in flight, closed as interrupted)"
    err.print(
        f"tokenmill router ready: http://{host}:{bound}/v1; {what}",
        highlight=False,
        soft_wrap=True,
    )
    await task


def listen_socket(host: str, port: int) -> socket.socket:
    """The bound listening socket. IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only
    on sockets that say they are TCP, and accepted sockets inherit this one's protocol; without
    it a kept-alive connection's next answer waits for the client's delayed ACK, 40 ms."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@app.command()
def status(
    url: Annotated[str, typer.Argument(help="The router's base URL, e.g. http://127.0.0.1:9000.")],
    admin_key_env: Annotated[
        str,
        typer.Option(help="A gateway's admin key is read from this environment variable (if set)."),
    ] = "TOKENMILL_ADMIN_KEY",
) -> None:
    """The live distribution of requests over the router's workers."""
    import httpx
    from rich.table import Table

    where = url.rstrip("/").removesuffix("/v1") + "/router/workers"
    key = os.environ.get(admin_key_env)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(where, headers=headers, timeout=10)
        data = response.json()
    except (httpx.HTTPError, ValueError) as e:
        err.print(f"[red]error:[/red] cannot read {escape(where)}: {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if response.status_code != 200:  # a gateway's: the admin key is required
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        hint = f" (the admin key comes from ${admin_key_env})" if response.status_code == 401 else ""
        err.print(
            f"[red]error:[/red] {escape(where)} answered {response.status_code}: "
            f"{escape(str(message or data))}{escape(hint)}",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    if not isinstance(data, dict) or not {"policy", "imbalance", "workers", "decisions"} <= data.keys():
        why = "is not a tokenmill router's worker list"
        err.print(f"[red]error:[/red] {escape(where)} {why}", soft_wrap=True)
        raise typer.Exit(2)
    title = f"policy {data['policy']}; imbalance (max/mean in-flight tokens) {data['imbalance']:.2f}"
    fields = [
        ("state", lambda w: "draining" if w["draining"] else ("healthy" if w["healthy"] else "ejected")),
        ("in flight", lambda w: str(w["in_flight"])),
        ("tokens in flight", lambda w: str(w["in_flight_tokens"])),
        ("routed", lambda w: str(w["routed"])),
        ("tokens routed", lambda w: str(w["routed_tokens"])),
        ("failed", lambda w: str(w["failed"])),
        ("cached tokens predicted", lambda w: str(w["predicted_hit_tokens"])),
        ("hit rate (worker's)", lambda w: _share(w.get("measured_hit_rate"))),
        (
            "prefill tok/s",
            lambda w: f"{w['prefill_tokens_per_s']:,.0f}" if w.get("prefill_tokens_per_s") else "-",
        ),
    ]
    if data["policy"] == "kv":
        fields.append(("KV blocks known", lambda w: str(w.get("kv_blocks_known", 0))))
    fields.append(("models", lambda w: ", ".join(w["models"]) if w.get("models") is not None else "?"))
    workers = data["workers"]
    names = [str(w["name"]) for w in workers]
    table = Table(title=title)
    # A row per worker needs about 140 columns; in fewer (80, a pipe) its headers were cut to
    # "work…": there a worker is a column and a figure a row, while the workers fit.
    if out.width < 140 and 24 + sum(len(n) + 3 for n in names) <= out.width:
        table.add_column("", no_wrap=True)
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)
        for label, value in fields:
            table.add_row(label, *(value(w) for w in workers))
    else:
        table.add_column("worker", no_wrap=True, min_width=max(map(len, names), default=6))
        for label, _ in fields:
            table.add_column(label, justify="left" if label == "state" else "right", overflow="fold")
        for w in workers:
            table.add_row(str(w["name"]), *(value(w) for _, value in fields))
    out.print(table)
    out.print(f"decisions: {data['decisions']}; streams cut by a failing worker: {data['streams_cut']}")


def _share(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"
