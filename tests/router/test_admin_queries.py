"""Admin and usage queries whose parameters look right but are not: each a 400 naming it."""

from __future__ import annotations

import pytest

from tests.router.test_admin_api import admin, app, assert_refused, gateway  # noqa: F401 (fixtures)


@pytest.mark.parametrize("day", ["20261202", "2026-W49", "2026-12-2", "2026-12-02T00:00"])
def test_a_usage_date_not_written_yyyy_mm_dd_is_a_400(app, day):  # noqa: F811
    # date.fromisoformat takes the first two, and they are not what the error promises.
    assert_refused(admin(app, "GET", f"/v1/usage?from={day}"), 400, "from", "from must be a date, YYYY-MM-DD")


def test_an_empty_team_filter_on_keys_is_a_400_not_every_teams_keys(app):  # noqa: F811
    assert admin(app, "POST", "/admin/keys", {"team": "premium"}).status == 200
    assert_refused(admin(app, "GET", "/admin/keys?team="), 400, "team", "team must name a team")
    assert len(admin(app, "GET", "/admin/keys").json()["keys"]) == 1
