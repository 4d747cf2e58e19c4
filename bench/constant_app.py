"""The ceiling for `/adv`: a bare ASGI app answering constant bytes, run by uvicorn like our server."""

from __future__ import annotations

from typing import Any

BODY = b'{"payload":"' + b"A" * 900 + b'"}'  # about the size of a one-signature advertisement
HEADERS = [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/jose+json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
