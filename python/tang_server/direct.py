"""The direct path: `/rec` and `/adv` answered by the protocol itself, without the ASGI machinery.

Per request, uvicorn's ASGI cycle costs more CPU than everything a Tang answer needs except the multiplication:
a task, an event, a scope, two messages each way and two writes. For a request whose route is a Tang route, whose
body has a declared length under the limit and that nothing else is waiting before, the protocol collects the
body and answers in the next loop iteration (as a task would start: requests parsed together are answered
in order, and each one's queueing is still measured for backpressure) with one write. The answer itself comes
from the same application code as on the general path (`TangApplication.answer_directly`), its bytes are laid out
as uvicorn lays them out, and it is counted and logged the same way. Everything else (other routes, chunked
bodies, `Expect: 100-continue`, upgrades, pipelined requests behind a general one, exchange threads) takes the
general path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from .app import TangRoute, declared_length
from .responses import Answer


@dataclass(slots=True)
class DirectRequest:
    route: TangRoute
    thp: str
    method: str
    target: bytes
    http_version: str
    keep_alive: bool
    client: str  # the client's address (through trusted proxies), for the access policy and the log
    arrival: float
    body: bytearray = field(default_factory=bytearray)
    #: Applying a key change off the loop before answering (see `TangHttpProtocol._answer_pending`).
    refresh: asyncio.Future[None] | None = None


def framed_by_length(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    """True when the body has a declared length under `limit` (or none) and no transfer coding."""
    if any(name == b"transfer-encoding" for name, _ in headers):
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
