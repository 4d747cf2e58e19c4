"""Client-side helpers: fetching and reading an advertisement (used by `show-keys`)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tang_server.keys import b64, jwk


def fetch_advertisement(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET `{url}/adv` and return the JWS document (not verified here: see `check.verified_keys`)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(f"{url.rstrip('/')}/adv", timeout=timeout) as response:  # noqa: S310
        document: dict[str, Any] = json.loads(response.read())
    return document


def advertised_keys(document: dict[str, Any]) -> list[dict[str, Any]]:
    payload = json.loads(b64.decode(document["payload"]))
    keys: list[dict[str, Any]] = payload["keys"]
    return keys


def verify_key_thumbprints(document: dict[str, Any]) -> list[str]:
    """S256 thumbprints of the advertised keys that allow `verify`, as `tang-show-keys` prints them."""
    return [jwk.thumbprint(key) for key in advertised_keys(document) if "verify" in key.get("key_ops", [])]
