"""What a gateway makes of its config as it starts: the file's teams applied to the ledger, and
warnings for what the file allows but the gateway cannot keep."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenmill.router.gateway_config import GatewayConfig, Price, Team
from tokenmill.router.ledger import Ledger

logger = logging.getLogger(__name__)


def apply_config_teams(config: GatewayConfig, ledger: Ledger) -> dict[str, Team]:
    """Set the file's teams in the ledger (the file wins for the teams it names), remove those that
    came from the file and are no longer in it (keys revoked: an operator removes a team from the
    file to cut its access), and return every team, the admin API's included."""
    for team in config.teams.values():
        ledger.save_team(team, source="config")
    removed = ledger.remove_config_teams(config.teams)
    if removed:
        logger.warning(
            "gateway: removed teams %s, and revoked their keys: they came from the gateway config and "
            "are no longer in it",
            ", ".join(removed),
        )
    return ledger.teams()


def warn_unpriced(teams: Iterable[Team], prices: dict[str, Price]) -> None:
    """Warn of teams with a dollar budget that may use a model with no price: their requests for it
    are refused (``gateway_request.check_priced``), which the operator should hear of at start, not
    from the team."""
    if "*" in prices:
        return  # every model has a price
    for team in teams:
        if team.budget is None or team.budget.dollars is None:
            continue
        if "*" in team.models:
            logger.warning(
                'team %s has a dollar budget and may use any model ("*"), but only %s have a price in '
                'the gateway config: its requests for any other are refused (add a "*" price to allow them)',
                team.name,
                ", ".join(sorted(prices)) or "no models",
            )
            continue
        missing = [m for m in team.models if m not in prices]
        if missing:
            logger.warning(
                "team %s has a dollar budget, but its models %s have no price in the gateway config: "
                'its requests for them are refused (add them under prices, or a "*" price)',
                team.name,
                ", ".join(missing),
            )
