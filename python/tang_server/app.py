"""The HTTP application: the Tang routes, matched the way the reference server matches them.

The reference matches regular expressions against the raw request target (no percent-decoding, query string
included), with elastic slashes and no redirects; a path that matches a route with the wrong method is 405;
anything else is 404; error responses have empty bodies. Starlette's own path routing decodes and normalises
paths, so the Tang routes are `TangRoute`s that implement exactly the reference's rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import TYPE_CHECKING

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound, Router
from starlette.types import Message, Receive, Scope, Send

from .accesslog import AccessLog
from .clientaddress import allowed, client_address, parse_networks
from .keyset import KeySet
from .keystore import KeyStore
from .recovery import recover
from .responses import ADVERTISEMENT_TYPE, JSON_TYPE, RECOVERY_TYPE, Answer, reply, send_answer
from .settings import Settings
from .usage import Usage

if TYPE_CHECKING:
    from .metrics import Metrics

logger = logging.getLogger(__name__)

RETRY_AFTER = ((b"retry-after", b"1"),)

Handler = Callable[[Scope, Receive, Send, str], Awaitable[None]]

#: uvicorn puts the request target exactly as received here (see `protocol.py`).
RAW_TARGET_EXTENSION = "tang.raw_target"
#: ... and the time.monotonic() when the request's headers were complete, to see how long it queued.
ARRIVAL_EXTENSION = "tang.arrival"


#: Where the matched route's template is left for the metrics.
ROUTE_KEY = "tang.route"

#: Where the application keeps the target once computed, so that each route does not compute it again.
TARGET_KEY = "tang.target"


def request_target(scope: Scope) -> bytes:
    """The request target as the client sent it; reconstructed when the server did not provide it."""
    cached = scope.get(TARGET_KEY)
    if cached is not None:
        return bytes(cached)
    raw = scope.get("extensions", {}).get(RAW_TARGET_EXTENSION)
    if raw is not None:
        return bytes(raw)
    query = scope.get("query_string", b"")
    return bytes(scope.get("raw_path") or scope["path"].encode()) + (b"?" + query if query else b"")


class TangRoute(BaseRoute):
    """One row of the route table: a regular expression over the raw target, one method, one handler."""

    def __init__(self, name: str, pattern: str, method: str, handler: Handler) -> None:
        self.name = name  # the route template, as metrics label it (never the key id: unbounded cardinality)
        self.pattern = re.compile(pattern.encode())
        self.method = method
        self.handler = handler

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        found = self.pattern.fullmatch(request_target(scope))
        if found is None:
            return Match.NONE, {}
        child = {"path_params": {"thp": found.group(1).decode() if found.groups() else ""}, ROUTE_KEY: self.name}
        return (Match.FULL if scope["method"] == self.method else Match.PARTIAL), child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != self.method:
            await reply(send, HTTPStatus.METHOD_NOT_ALLOWED)
            return
        await self.handler(scope, receive, send, scope["path_params"]["thp"])

    def url_path_for(self, name: str, /, **path_params: object) -> URLPath:  # pragma: no cover - unused
        raise NoMatchFound(name, path_params)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await reply(send, HTTPStatus.NOT_FOUND)


class TangApplication:
    """Checks the request target's length, then dispatches through the route table."""

    def __init__(
        self,
        store: KeyStore,
        settings: Settings,
        access_log: AccessLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        #: Set on SIGTERM (`server.DrainingServer`): readiness fails at once while requests are still served.
        self.draining = False
        self.access_log = access_log
        self.metrics = metrics
        ledger = None
        if settings.state_dir is not None:
            from .ledger import Ledger  # sqlite3 is imported only when there is a ledger

            ledger = Ledger(
                settings.state_dir, clients=settings.ledger_clients, retention_days=settings.ledger_retention_days
            )
        self.usage = Usage(
            lambda: store.keyset,
            metrics,
            ledger,
            clients=settings.ledger_clients,
            flush_seconds=settings.usage_flush_seconds,
        )
        self.trusted = parse_networks(settings.trusted_proxies)
        self.may_recover = parse_networks(settings.allow_recovery)
        self.may_advertise = parse_networks(settings.allow_advertisement)
        self.exchange_pool = (
            ThreadPoolExecutor(settings.exchange_threads, thread_name_prefix="tang-exchange")
            if settings.exchange_threads
            else None
        )
        prefix = "/+" + re.escape(settings.prefix.strip("/")) if settings.prefix.strip("/") else ""
        thp = "/+([0-9A-Za-z_-]+)"
        #: The Tang routes proper, which the protocol may also answer directly (`direct_route`).
        self.tang_routes = (
            # Recovery first: in a boot storm it is most of the traffic and the router stops at a match.
            TangRoute("/rec/{thp}", f"{prefix}/+rec{thp}", "POST", self.recover),
            TangRoute("/adv", f"{prefix}/+adv/*", "GET", self.advertise),
            TangRoute("/adv/{thp}", f"{prefix}/+adv{thp}", "GET", self.advertise),
        )
        self.router = Router(
            routes=[
                *self.tang_routes,
                TangRoute("health", re.escape(settings.health_path), "GET", self.health),
                TangRoute("ready", re.escape(settings.ready_path), "GET", self.ready),
                TangRoute("metrics", re.escape(settings.metrics_path), "GET", self.expose_metrics),
                TangRoute("status", re.escape(settings.status_path), "GET", self.status),
            ],
            redirect_slashes=False,  # clevis runs curl without -L: a redirect is a failed unlock
            default=not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        target = request_target(scope)
        scope[TARGET_KEY] = target
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            if len(target) >= self.settings.max_target_bytes:
                await reply(tracking_send, HTTPStatus.REQUEST_URI_TOO_LONG)
            elif declared_length(scope["headers"]) >= self.settings.max_body_bytes:
                finished = await _discard_body(receive)
                await reply(tracking_send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, extra_headers=_closing(finished))
            else:
                await self.router(scope, receive, tracking_send)
        except Exception:
            # A bug must not become a response with a body (or a traceback): log it, answer an empty 500.
            logger.exception("error answering %s", scope.get("method"))
            if not status:
                await reply(tracking_send, HTTPStatus.INTERNAL_SERVER_ERROR)
        finally:
            self.record(
                scope.get(ROUTE_KEY, "unmatched"),
                scope["method"],
                target,
                scope.get("http_version", "1.1"),
                self._client(scope),
                status,
                time.perf_counter() - began,
            )
            if self.metrics is not None:
                self.metrics.in_flight.dec()

    def record(
        self,
        route: str,
        method: str,
        target: bytes,
        http_version: str,
        client: str,
        status: int,
        elapsed: float,
    ) -> None:
        """Counts an answered request in the metrics and writes its access log line."""
        if self.metrics is not None:
            self.metrics.answered(route, method, status, elapsed)
        if self.access_log is not None:
            self.access_log.record(client, method, target[:256].decode("latin-1"), http_version, status, elapsed)

    def _client(self, scope: Scope) -> str:
        peer = scope.get("client")
        return client_address(peer[0] if peer else None, forwarded_for(scope["headers"]), self.trusted)

    def direct_route(self, method: str, target: bytes) -> tuple[TangRoute, str] | None:
        """The Tang route and key id of a request the protocol may answer without the ASGI machinery
        (`answer_directly`); None when it must take the general path."""
        if self.exchange_pool is not None or len(target) >= self.settings.max_target_bytes:
            return None
        for route in self.tang_routes:
            found = route.pattern.fullmatch(target)
            if found is not None:
                if method != route.method:
                    return None  # 405 on the general path
                return route, found.group(1).decode() if found.groups() else ""
        return None

    def answer_directly(
        self, route: TangRoute, thp: str, client: str, body: bytes, arrival: float, keyset: KeySet
    ) -> Answer:
        """The answer to a request for `direct_route`'s route, its body complete, with a fresh key set."""
        if route.method == "GET":
            return self._advertisement(client, thp, keyset)
        return self._refusal(client, arrival) or self._recovery(thp, body, keyset, client)

    async def advertise(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        await send_answer(send, self._advertisement(self._client(scope), thp, await self.store.current()))

    def _advertisement(self, client: str, thp: str, keyset: KeySet) -> Answer:
        if not allowed(client, self.may_advertise):
            return Answer(HTTPStatus.FORBIDDEN)
        body = keyset.advertisements.get(thp) if thp else keyset.default_advertisement
        if body is not None:
            return Answer(HTTPStatus.OK, body, ADVERTISEMENT_TYPE)
        return Answer(HTTPStatus.NOT_FOUND if thp else HTTPStatus.INTERNAL_SERVER_ERROR)

    async def recover(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        client = self._client(scope)
        refusal = self._refusal(client, scope.get("extensions", {}).get(ARRIVAL_EXTENSION))
        if refusal is not None:
            await send_answer(send, refusal)
            return
        body, finished = await _read_body(receive, self.settings.max_body_bytes)
        if body is None:
            await reply(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, extra_headers=_closing(finished))
            return
        keyset = await self.store.current()
        if self.exchange_pool is None:
            await send_answer(send, self._recovery(thp, body, keyset, client))
            return
        # The multiplication releases the GIL, so pool threads can use other cores.
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(self.exchange_pool, self._recovery, thp, body, keyset, client)
        await send_answer(send, answer)

    def _refusal(self, client: str, arrival: float | None) -> Answer | None:
        """Why a recovery is refused before its body is even read, if it is."""
        if not allowed(client, self.may_recover):
            # NBDE's security rests on who can reach the server: outside the listed networks, no unlock.
            return Answer(HTTPStatus.FORBIDDEN)
        if self._overloaded(arrival):
            # Waited too long already: say so at once (clevis retries) rather than add this multiplication to
            # the queue that every later request waits behind.
            if self.metrics is not None:
                self.metrics.shed.inc()
            return Answer(HTTPStatus.SERVICE_UNAVAILABLE, extra_headers=RETRY_AFTER)
        return None

    def _recovery(self, thp: str, body: bytes, keyset: KeySet, client: str) -> Answer:
        began = time.perf_counter()
        status, answer = recover(keyset, thp, body)
        if self.metrics is not None:
            self.metrics.exchange.observe(time.perf_counter() - began)
        if status == HTTPStatus.OK:
            key = keyset.find(thp)
            assert key is not None
            self.usage.recovered(key, client)
        elif status == HTTPStatus.NOT_FOUND:  # a valid request whose key id matches no key
            self.usage.unknown(thp, client)
        return Answer(status, answer, RECOVERY_TYPE if status == HTTPStatus.OK else None)

    async def health(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        """Liveness: the process answers. Deliberately independent of keys (a restart would not bring them)."""
        await reply(send, HTTPStatus.OK, b'{"status":"ok"}', JSON_TYPE)

    async def ready(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        """Readiness: a key set that can serve clients (a visible signing and exchange key) is loaded, and the
        process is not draining (stopping: load balancers must send new requests elsewhere)."""
        keyset = await self.store.current(generate=False)  # a probe never generates keys; only Tang requests do
        ready = keyset.ready and not self.draining
        body = {
            "ready": ready,
            "draining": self.draining,
            "digest": keyset.digest,
            "problems": list(keyset.problems),
            "directory_error": self.store.failure,
        }
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        await reply(send, status, json.dumps(body, separators=(",", ":")).encode(), JSON_TYPE)

    def _overloaded(self, arrival: float | None) -> bool:
        """True when a request that arrived at `arrival` (time.monotonic()) has waited past --max-queue-ms."""
        if not self.settings.max_queue_ms or arrival is None:
            return False
        return time.monotonic() - arrival > self.settings.max_queue_ms / 1000

    async def expose_metrics(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        if self.metrics is None:
            await reply(send, HTTPStatus.NOT_FOUND)
            return
        await self.metrics.expose(scope, receive, send)

    async def status(self, scope: Scope, receive: Receive, send: Send, thp: str) -> None:
        """What this worker serves, for fleet tooling: public information only (thumbprints, never keys)."""
        keyset = await self.store.current(generate=False)
        body = {
            "digest": keyset.digest,
            "ready": keyset.ready,
            "visible": [{"kid": key.kid, "kind": key.kind.value} for key in keyset.visible],
            "hidden": [{"kid": key.kid, "kind": key.kind.value} for key in keyset.hidden],
            "loaded_at": self.store.loaded_at,
            "problems": list(keyset.problems),
            "directory_error": self.store.failure,
            "pid": os.getpid(),
            # Per-key recoveries of this replica (every worker): counts and times only, never client addresses.
            "usage": await asyncio.to_thread(self.usage.report),
        }
        await reply(send, HTTPStatus.OK, json.dumps(body, separators=(",", ":")).encode(), JSON_TYPE)


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """Every X-Forwarded-For header's hops, in order (several headers mean one comma-separated list)."""
    values = [bytes(value) for name, value in headers if name == b"x-forwarded-for"]
    return b",".join(values) if values else None


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The Content-Length header's value, 0 without one (httptools has refused malformed ones already)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


#: How much of an oversized body is read and thrown away before answering 413. Closing a connection with unread
#: data makes the kernel send a reset, and the client may never see the answer; reading an unbounded body
#: would let a client keep a worker busy, so beyond this the answer says `Connection: close` and the connection
#: is closed (uvicorn would otherwise go on reading, and discarding, the rest).
DISCARD_LIMIT = 1 << 20


def _closing(finished: bool) -> list[tuple[bytes, bytes]] | None:
    """The extra header of a 413: close the connection when the body was not read to its end."""
    return None if finished else [(b"connection", b"close")]


async def _read_body(receive: Receive, limit: int) -> tuple[bytes | None, bool]:
    """The whole request body, or None once it reaches `limit` bytes (chunked bodies have no declared length);
    and whether the body was read to its end."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size >= limit:
            if message.get("more_body", False):
                return None, await _discard_body(receive, DISCARD_LIMIT - size)
            return None, True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


async def _discard_body(receive: Receive, limit: int = DISCARD_LIMIT) -> bool:
    """Reads and drops up to `limit` bytes of body; True when the body ended (or the client left) by then."""
    discarded = 0
    while discarded < limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False
