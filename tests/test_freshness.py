"""A change to the key directory is visible to the very next request, on every worker, as with the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tang_server.keys import b64, keyfiles

from .support import client_key, load_keys, our_server, request, thumbprint


def _advertised(port: int) -> set[str]:
    """The key ids of the default advertisement, which must be served (a broken /adv advertises nothing)."""
    response = request(port, "GET", "/adv")
    assert response.status == 200, response
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {thumbprint(key) for key in payload["keys"]}


def test_hide_delete_add_seen_by_next_request(keys: Path, tmp_path: Path) -> None:
    signing, exchange = load_keys(keys)
    sig_name, exc_name = f"{thumbprint(signing)}.jwk", f"{thumbprint(exchange)}.jwk"
    rec = f"/rec/{thumbprint(exchange)}"
    body = json.dumps(client_key()).encode()
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        for _ in range(60):
            # hide the exchange key: not advertised, still answers /rec
            os.rename(keys / exc_name, keys / f".{exc_name}")
            assert thumbprint(exchange) not in _advertised(server.port)
            assert request(server.port, "POST", rec, body).status == 200
            # un-hide it again
            os.rename(keys / f".{exc_name}", keys / exc_name)
            assert thumbprint(exchange) in _advertised(server.port)
            # delete it: gone on the next request
            saved = (keys / exc_name).read_bytes()
            (keys / exc_name).unlink()
            assert request(server.port, "POST", rec, body).status == 404
            # add it back (as a tool would: write then rename into place)
            (keys / "incoming.tmp").write_bytes(saved)
            os.rename(keys / "incoming.tmp", keys / exc_name)
            assert request(server.port, "POST", rec, body).status == 200
            assert _advertised(server.port) == {thumbprint(signing), thumbprint(exchange)}
        # removing the only visible signing key makes /adv fail at once (no key generation here)
        os.rename(keys / sig_name, keys / f".{sig_name}")
        assert request(server.port, "GET", "/adv").status == 500
        assert request(server.port, "GET", f"/adv/{thumbprint(signing)}").status == 200


def test_new_pair_from_keygen_served_at_once(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", workers=2) as server:
        before = _advertised(server.port)
        written = keyfiles.generate_keys(keys)
        after = _advertised(server.port)
    assert before < after
    assert {p.name.removesuffix(".jwk") for p in written} == after - before
