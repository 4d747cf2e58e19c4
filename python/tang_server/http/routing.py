"""The route table: the one place that maps a request's method and raw target to a route and key id, or to 404/405.

The reference matches regular expressions against the raw request target (no percent-decoding, query string
included), with elastic slashes and no redirects; a target that matches a route with the wrong method is 405;
anything else is 404. Both request paths (the protocol's direct path and the ASGI path) dispatch here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import NamedTuple

from tang_server.settings import Settings

_KEY_ID = "/+([0-9A-Za-z_-]+)"
#: Targets whose match is remembered: a server sees the same few again and again (/adv, /rec/ per key), and
#: matching the patterns cost a twentieth of an /adv request. Bounded (at most this many targets of at most
#: --max-target-bytes each), least recently used forgotten first.
REMEMBERED_TARGETS = 256


class Route(NamedTuple):
    #: The template metrics label it with (never the key id: its values are unbounded).
    name: str
    method: str
    pattern: re.Pattern[bytes]
    #: A Tang route, answered from the key set alone: the protocol may answer it without the ASGI cycle.
    tang: bool


class Match(NamedTuple):
    route: Route | None
    #: The key id in the target ("" for routes without one).
    thp: str = ""
    #: 0 when routed, else the status the request gets (404, 405).
    status: int = 0


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        #: The route and key id for a method and raw target, or the status it gets.
        self.dispatch: Callable[[str, bytes], Match] = functools.lru_cache(REMEMBERED_TARGETS)(self._match)

    def _match(self, method: str, target: bytes) -> Match:
        for route in self.routes:
            found = route.pattern.fullmatch(target)
            if found is not None:
                if method != route.method:
                    return Match(None, status=HTTPStatus.METHOD_NOT_ALLOWED)
                return Match(route, found.group(1).decode() if found.groups() else "")
        return Match(None, status=HTTPStatus.NOT_FOUND)


def route_table(settings: Settings) -> RouteTable:
    """The Tang routes (under the prefix, as `tangd -e` puts them), then the operational endpoints (exact paths)."""
    prefix = "/+" + re.escape(settings.prefix.strip("/")) if settings.prefix.strip("/") else ""

    def row(name: str, pattern: str, method: str = "GET", *, tang: bool = False) -> Route:
        return Route(name, method, re.compile(pattern.encode()), tang)

    return RouteTable(
        (
            # Recovery first: in a boot storm it is most of the traffic, and dispatch stops at a match.
            row("/rec/{thp}", f"{prefix}/+rec{_KEY_ID}", "POST", tang=True),
            row("/adv", f"{prefix}/+adv/*", tang=True),
            row("/adv/{thp}", f"{prefix}/+adv{_KEY_ID}", tang=True),
            row("health", re.escape(settings.health_path)),
            row("ready", re.escape(settings.ready_path)),
            row("metrics", re.escape(settings.metrics_path)),
            row("status", re.escape(settings.status_path)),
        )
    )
