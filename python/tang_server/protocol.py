"""uvicorn's httptools protocol with two changes the Tang protocol needs.

- The request target is kept exactly as the client sent it. uvicorn parses it into `raw_path` and
  `query_string`, which loses what the reference server's routing sees: an absolute-form target
  (`GET http://host/adv`, 404 for the reference) and an empty query (`/adv?`, also 404). The raw bytes go into
  the scope's extensions, where `app.request_target` looks first.
- A client that half-closes its connection after sending (shutdown(SHUT_WR), or the end of standard input for
  `tangd`) still gets every answer it asked for; uvicorn would drop the connection with answers pending.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import RAW_TARGET_EXTENSION


class TangHttpProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        self.scope["extensions"] = {RAW_TARGET_EXTENSION: self.url}  # type: ignore[dict-item]
        super().on_headers_complete()

    client_done = False

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio allows True: keep our side open
        self.client_done = True
        return not self._idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.client_done and self._idle():
            self.transport.close()

    def _idle(self) -> bool:
        return not self.pipeline and (self.cycle is None or self.cycle.response_complete)
