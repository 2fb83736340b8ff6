"""Per-team limits when a team is deleted and made again while its requests are in flight."""

from __future__ import annotations

from tests.router.test_limits import limiter
from tokenmill.router.gateway_config import Budget, Team
from tokenmill.router.limits import Refusal, Reservation


def test_requests_of_a_deleted_team_do_not_give_slots_to_the_team_made_again_under_its_name():
    """``DELETE /admin/teams/a`` then ``POST /admin/teams`` for ``a`` again, while two requests of
    the first ``a`` run: when they end, they must not be refunded to the new ``a`` (before, its
    count of requests in flight went to -2 and its budget's tokens in flight below zero, so it
    could run two past its max_parallel and spend past its budget)."""
    team = Team("a", max_parallel=2, budget=Budget("day", tokens=1000))
    lim, _, _ = limiter(team)
    old = [lim.admit("a", 100, 0.0) for _ in range(2)]
    assert all(isinstance(r, Reservation) for r in old)
    lim.forget("a")
    lim.configure(team)  # made again, from nothing
    for r in old:
        assert isinstance(r, Reservation)
        lim.release(r, 0, 0.0)
    assert lim.in_flight("a") == 0
    new = [lim.admit("a", 100, 0.0) for _ in range(3)]
    assert [isinstance(r, Refusal) for r in new] == [False, False, True]
    assert new[2].limit == "max_parallel"  # type: ignore[union-attr]
    assert isinstance(lim.admit("a", 1, 0.0), Refusal)


def test_a_team_changed_while_its_requests_run_still_gets_them_back():
    team = Team("a", max_parallel=1)
    lim, _, _ = limiter(team)
    r = lim.admit("a", 100, 0.0)
    assert isinstance(r, Reservation)
    lim.configure(Team("a", max_parallel=1, tokens_per_minute=1000))  # a reconfigure keeps what runs
    assert isinstance(lim.admit("a", 100, 0.0), Refusal)
    lim.release(r, 100, 0.0)
    assert lim.in_flight("a") == 0
    assert isinstance(lim.admit("a", 100, 0.0), Reservation)
