"""Whole responses: status, Content-Length, optional Content-Type, and any extra headers.

An `Answer` is sent either as one ASGI message pair (`reply`) or, on the direct path (`direct.py`), written as
bytes laid out exactly as uvicorn lays out the ASGI pair.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.types import Send

ADVERTISEMENT_TYPE = b"application/jose+json"
RECOVERY_TYPE = b"application/jwk+json"
JSON_TYPE = b"application/json"


class Answer(NamedTuple):
    status: int
    body: bytes = b""
    content_type: bytes | None = None
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-length", str(len(self.body)).encode())]
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type))
        headers.extend(self.extra_headers)
        return headers


async def send_answer(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers()})
    await send({"type": "http.response.body", "body": answer.body})


async def reply(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_answer(send, Answer(status, body, content_type, tuple(extra_headers or ())))
