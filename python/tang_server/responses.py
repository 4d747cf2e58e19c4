"""Sending a whole response in one ASGI message pair: status, Content-Length, optional Content-Type."""

from __future__ import annotations

from starlette.types import Send

ADVERTISEMENT_TYPE = b"application/jose+json"
RECOVERY_TYPE = b"application/jwk+json"
JSON_TYPE = b"application/json"


async def reply(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
