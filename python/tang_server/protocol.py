"""uvicorn's httptools protocol, keeping the request target exactly as the client sent it.

uvicorn parses the target into `raw_path` and `query_string`, which loses what the reference server's routing
sees: an absolute-form target (`GET http://host/adv`, 404 for the reference) and an empty query (`/adv?`, also
404). The raw bytes go into the scope's extensions, where `app.request_target` looks first.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import RAW_TARGET_EXTENSION


class TangHttpProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        self.scope["extensions"] = {RAW_TARGET_EXTENSION: self.url}  # type: ignore[dict-item]
        super().on_headers_complete()
