"""What a gateway makes of its config as it starts: warnings for what the file allows but the
gateway cannot keep."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenmill.router.gateway_config import Price, Team

logger = logging.getLogger(__name__)


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
