"""The HTTP application: requests to answers, for both request paths.

`routing.py` maps every request to a route (or to 404/405). Each route has one function that turns a `Request`
into an `Answer`: the Tang routes synchronously from a key set, so that the protocol can answer them on its direct
path (`direct.py`) with the same code as the ASGI path here; the operational endpoints asynchronously. The access
policy and backpressure (`refusal`) are decided before a body is read; transport limits (408, 414, 431) are the
protocol's; the body limit (413) is decided here for both paths (`framed_by_length` on the direct path).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from starlette.types import Message, Receive, Scope, Send

from tang_server.http.accesslog import AccessLog
from tang_server.http.clientaddress import allowed, client_address, parse_networks
from tang_server.http.responses import ADVERTISEMENT_TYPE, JSON_TYPE, RECOVERY_TYPE, Answer, send_answer
from tang_server.http.routing import Match, Route, route_table
from tang_server.keys.keyset import KeySet
from tang_server.keys.keystore import KeyStore
from tang_server.keys.recovery import recover
from tang_server.ops.usage import Usage
from tang_server.settings import Settings

if TYPE_CHECKING:
    from tang_server.ops.metrics import Metrics

logger = logging.getLogger(__name__)

RETRY_AFTER = ((b"retry-after", b"1"),)

#: uvicorn puts the request target exactly as received here (see `protocol.py`).
RAW_TARGET_EXTENSION = "tang.raw_target"
#: ... and the time.monotonic() when the request's headers were complete, to see how long it queued.
ARRIVAL_EXTENSION = "tang.arrival"


@dataclass(slots=True)
class Request:
    method: str
    target: bytes
    http_version: str
    #: The client's address (through trusted proxies), for the access policy, the ledger and the log.
    client: str
    #: time.monotonic() when the headers were complete; None when unknown (backpressure then never refuses).
    arrival: float | None
    #: Only the general path's operational endpoints need headers.
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


TangHandler = Callable[[Request, str, KeySet], Answer]
Endpoint = Callable[[Request], Awaitable[Answer]]


def request_target(scope: Scope) -> bytes:
    """The request target as the client sent it; reconstructed when the server did not provide it."""
    raw = scope.get("extensions", {}).get(RAW_TARGET_EXTENSION)
    if raw is not None:
        return bytes(raw)
    query = scope.get("query_string", b"")
    return bytes(scope.get("raw_path") or scope["path"].encode()) + (b"?" + query if query else b"")


class TangApplication:
    """The ASGI application, and the answers the protocol's direct path asks for (`direct.DirectAnswers`)."""

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
            from tang_server.ops.ledger import Ledger  # sqlite3 is imported only when there is a ledger

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
        self.routes = route_table(settings)
        self.max_body_bytes = settings.max_body_bytes
        #: The Tang routes' answers, from the request, its key id and a key set.
        self.tang_handlers: dict[str, TangHandler] = {
            "/rec/{thp}": self._recovery,
            "/adv": self._advertisement,
            "/adv/{thp}": self._advertisement,
        }
        self.endpoints: dict[str, Endpoint] = {
            "health": self.health,
            "ready": self.ready,
            "metrics": self.expose_metrics,
            "status": self.status,
        }
        #: With exchange threads the multiplication leaves the event loop: only the ASGI path can await it.
        self.answers_directly = self.exchange_pool is None

    # The direct path's interface (`direct.DirectAnswers`).

    def dispatch(self, method: str, target: bytes) -> Match:
        return self.routes.dispatch(method, target)

    def client(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str:
        # The headers are looked through only when a proxy is trusted: per request, that costs as much as routing.
        return client_address(peer, forwarded_for(headers) if self.trusted else None, self.trusted)

    def answer(self, route: Route, thp: str, request: Request, keyset: KeySet) -> Answer:
        """A Tang route's answer to a complete request, from `keyset` (which must include every change completed
        before the request arrived)."""
        return self.refusal(route, request) or self.tang_handlers[route.name](request, thp, keyset)

    def record(self, route: str, request: Request, status: int, elapsed: float) -> None:
        """Counts an answered request in the metrics and writes its access log line."""
        if self.metrics is not None:
            self.metrics.answered(route, request.method, status, elapsed)
        log = self.access_log
        if log is not None:
            log.record(request.client, request.method, request.target, request.http_version, status, elapsed)

    # The ASGI path.

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; nothing else is served
        began = time.perf_counter()
        status = 0

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        peer = scope.get("client")
        request = Request(
            method=scope["method"],
            target=request_target(scope),
            http_version=scope.get("http_version", "1.1"),
            client=self.client(peer[0] if peer else None, scope["headers"]),
            arrival=scope.get("extensions", {}).get(ARRIVAL_EXTENSION),
            headers=tuple(scope["headers"]),
        )
        match = self.dispatch(request.method, request.target)
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            await send_answer(tracking_send, await self._answer_general(match, request, receive))
        except Exception:
            # A bug must not become a response with a body (or a traceback): log it, answer an empty 500.
            logger.exception("error answering %s", request.method)
            if not status:
                await send_answer(tracking_send, Answer(HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            route = match.route.name if match.route is not None else "unmatched"
            self.record(route, request, status, time.perf_counter() - began)
            if self.metrics is not None:
                self.metrics.in_flight.dec()

    async def _answer_general(self, match: Match, request: Request, receive: Receive) -> Answer:
        if declared_length(request.headers) >= self.max_body_bytes:  # before routing, as the reference
            return _too_large(await _discard_body(receive))
        if match.route is None:
            return Answer(match.status)
        if not match.route.tang:
            return await self.endpoints[match.route.name](request)
        refusal = self.refusal(match.route, request)
        if refusal is not None:
            return refusal
        handler = self.tang_handlers[match.route.name]
        if match.route.method == "GET":
            return handler(request, match.thp, await self.store.current())
        body, finished = await _read_body(receive, self.max_body_bytes)
        if body is None:
            return _too_large(finished)
        request.body = body
        keyset = await self.store.current()
        if self.exchange_pool is None:
            return handler(request, match.thp, keyset)
        # The multiplication releases the GIL, so pool threads can use other cores.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.exchange_pool, handler, request, match.thp, keyset)

    # The Tang routes.

    def refusal(self, route: Route, request: Request) -> Answer | None:
        """Why a Tang request is refused before its body is even read, if it is: the access policy, then
        backpressure."""
        if route.method == "GET":
            return None if allowed(request.client, self.may_advertise) else Answer(HTTPStatus.FORBIDDEN)
        if not allowed(request.client, self.may_recover):
            # NBDE's security rests on who can reach the server: outside the listed networks, no unlock.
            return Answer(HTTPStatus.FORBIDDEN)
        if self._overloaded(request.arrival):
            # Waited too long already: say so at once (clevis retries) rather than add this multiplication to
            # the queue that every later request waits behind.
            if self.metrics is not None:
                self.metrics.shed.inc()
            return Answer(HTTPStatus.SERVICE_UNAVAILABLE, extra_headers=RETRY_AFTER)
        return None

    def _advertisement(self, request: Request, thp: str, keyset: KeySet) -> Answer:
        body = keyset.advertisements.get(thp) if thp else keyset.default_advertisement
        if body is not None:
            return Answer(HTTPStatus.OK, body, ADVERTISEMENT_TYPE)
        return Answer(HTTPStatus.NOT_FOUND if thp else HTTPStatus.INTERNAL_SERVER_ERROR)

    def _recovery(self, request: Request, thp: str, keyset: KeySet) -> Answer:
        began = time.perf_counter()
        status, answer = recover(keyset, thp, request.body)
        if self.metrics is not None:
            self.metrics.exchanged(time.perf_counter() - began)
        if status == HTTPStatus.OK:
            key = keyset.find(thp)
            assert key is not None
            self.usage.recovered(key, request.client)
        elif status == HTTPStatus.NOT_FOUND:  # a valid request whose key id matches no key
            self.usage.unknown(thp, request.client)
        return Answer(status, answer, RECOVERY_TYPE if status == HTTPStatus.OK else None)

    def _overloaded(self, arrival: float | None) -> bool:
        """True when a request that arrived at `arrival` (time.monotonic()) has waited past --max-queue-ms."""
        if not self.settings.max_queue_ms or arrival is None:
            return False
        return time.monotonic() - arrival > self.settings.max_queue_ms / 1000

    # The operational endpoints.

    async def health(self, request: Request) -> Answer:
        """Liveness: the process answers. Deliberately independent of keys (a restart would not bring them)."""
        return Answer(HTTPStatus.OK, b'{"status":"ok"}', JSON_TYPE)

    async def ready(self, request: Request) -> Answer:
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
        return Answer(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, _json(body), JSON_TYPE)

    async def expose_metrics(self, request: Request) -> Answer:
        if self.metrics is None:
            return Answer(HTTPStatus.NOT_FOUND)
        return self.metrics.exposition(request.headers)

    async def status(self, request: Request) -> Answer:
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
        return Answer(HTTPStatus.OK, _json(body), JSON_TYPE)


def _json(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


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


def _too_large(finished: bool) -> Answer:
    """A 413; it closes the connection when the body was not read to its end."""
    return Answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, extra_headers=() if finished else ((b"connection", b"close"),))


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
