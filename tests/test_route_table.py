"""The route table's memory of targets (`routing.REMEMBERED_TARGETS`): bounded, and never changes an answer.

What each target routes to is tested against the reference server in test_routes.py; here the same targets are
routed again after their memory has been pushed out by many others.
"""

from __future__ import annotations

from pathlib import Path

from tang_server.http.routing import REMEMBERED_TARGETS, Match, route_table
from tang_server.settings import Settings


def expected(number: int) -> tuple[str, bytes, Match]:
    """A request, and its match written out by hand: one of every kind of answer, key ids distinct per number."""
    thp = f"key{number}"
    kind = number % 4
    if kind == 0:
        return "GET", f"/adv/{thp}".encode(), Match(ROUTES["/adv/{thp}"], thp)
    if kind == 1:
        return "POST", f"//rec//{thp}".encode(), Match(ROUTES["/rec/{thp}"], thp)
    if kind == 2:
        return "GET", f"/rec/{thp}".encode(), Match(None, status=405)
    return "GET", f"/adv/{thp}?".encode(), Match(None, status=404)


TABLE = route_table(Settings(keys_dir=Path("/nonexistent")))
ROUTES = {route.name: route for route in TABLE.routes}


def test_targets_route_the_same_after_being_forgotten() -> None:
    requests = [expected(number) for number in range(REMEMBERED_TARGETS * 4)]
    for _ in range(2):  # the second time round, every target has been forgotten since it was routed
        for method, target, match in requests:
            assert TABLE.dispatch(method, target) == match
            assert TABLE.dispatch(method, target) == match  # remembered
    assert TABLE.dispatch.cache_info().currsize == REMEMBERED_TARGETS  # type: ignore[attr-defined]
    assert TABLE.dispatch("GET", b"/adv") == Match(ROUTES["/adv"], "")
