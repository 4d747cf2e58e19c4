"""The direct path: `/rec` and `/adv` answered by the protocol itself, without the ASGI machinery.

Per request, uvicorn's ASGI cycle costs more CPU than everything a Tang answer needs except the multiplication:
a task, an event, a scope, two messages each way and two writes. For a request whose route is a Tang route, whose
body has a declared length under the limit and that nothing else is waiting before, the protocol collects the
body and answers in the next loop iteration (as a task would start: requests parsed together are answered
in order, and each one's queueing is still measured for backpressure) with one write. The answer itself comes
from the same application code as on the general path (`TangApplication.answer`), its bytes are laid out
as uvicorn lays them out, and it is counted and logged the same way. Everything else (other routes, chunked
bodies, `Expect: 100-continue`, upgrades, pipelined requests behind a general one, exchange threads) takes the
general path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from tang_server.http.app import Request, declared_length
from tang_server.http.responses import Answer
from tang_server.http.routing import Match, Route
from tang_server.keys.keyset import KeySet


class FreshKeys(Protocol):
    """The key store, as the direct path sees it (`keystore.KeyStore`)."""

    @property
    def keyset(self) -> KeySet: ...
    def is_fresh(self) -> bool: ...
    def refresh(self) -> None: ...


@runtime_checkable
class DirectAnswers(Protocol):
    """What the protocol needs of the application to answer on the direct path (`app.TangApplication`)."""

    draining: bool
    max_body_bytes: int
    #: False when the Tang routes' answers cannot be computed on the event loop (exchange threads).
    answers_directly: bool

    @property
    def store(self) -> FreshKeys: ...

    def dispatch(self, method: str, target: bytes) -> Match: ...
    def client(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str: ...
    def answer(self, route: Route, thp: str, request: Request, keyset: KeySet) -> Answer: ...
    def record(self, route: str, request: Request, status: int, elapsed: float) -> None: ...


@dataclass(slots=True)
class DirectRequest:
    route: Route
    thp: str
    request: Request
    keep_alive: bool
    body: bytearray
    #: Applying a key change off the loop before answering (see `TangHttpProtocol._answer_pending`).
    refresh: asyncio.Future[None] | None = None


def framed_by_length(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    """True when the body has a declared length under `limit` (or none) and no transfer coding."""
    for name, _ in headers:  # a loop, not any() over a generator: this runs per request
        if name == b"transfer-encoding":
            return False
    return declared_length(headers) < limit


def answer_bytes(answer: Answer, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    """The whole response, byte for byte as uvicorn writes the same answer sent as ASGI messages."""
    content = [STATUS_LINE[answer.status]]
    for name, value in (*default_headers, *answer.headers()):
        content.extend((name, b": ", value, b"\r\n"))
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content.extend((b"\r\n", answer.body))
    return b"".join(content)


class RememberedAnswerBytes:
    """`answer_bytes`, remembering the last answer laid out. Every /adv answer of one key set within one second
    (uvicorn replaces `default_headers`, which carry the Date, once a second) is the same bytes, and laying them
    out again cost a twentieth of an /adv request's CPU."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[Answer | None, object, bool, bytes] = (None, None, False, b"")

    def __call__(self, answer: Answer, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
        last_answer, last_headers, last_keep_alive, data = self._last
        # The headers list by identity (uvicorn never changes one in place; the memory keeps it alive, so a new
        # list cannot take its id), the answer by value (a /adv answer is a new tuple around the same body).
        if default_headers is last_headers and keep_alive is last_keep_alive and answer == last_answer:
            return data
        data = answer_bytes(answer, default_headers, keep_alive)
        self._last = (answer, default_headers, keep_alive, data)
        return data
