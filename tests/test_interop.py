"""Interoperability with the real client (clevis), the reference server (tang) and the jose oracle.

These run in CI: `make test` installs clevis, jose, tang, socat and curl from Debian.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tang_server.keys import keyfiles

from .support import (
    BIN,
    client_key,
    free_port,
    load_keys,
    our_server,
    reference_server,
    request,
    require_tools,
    running,
    serve_command,
    thumbprint,
)

HASHES = ["S1", "S224", "S256", "S384", "S512"]


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("clevis", "jose", "socat", "curl", "/usr/libexec/tangd")


def encrypt(url: str, secret: bytes, **config: str) -> bytes:
    pin = json.dumps({"url": url, **config})
    command = ["clevis", "encrypt", "tang", pin] + ([] if "thp" in config else ["-y"])
    return subprocess.run(command, input=secret, check=True, capture_output=True, timeout=60).stdout


def decrypt(jwe: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60)


def test_clevis_round_trip(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log") as server:
        jwe = encrypt(server.url, b"hi\n")
        assert decrypt(jwe).stdout == b"hi\n"


@pytest.mark.parametrize("hash_name", ["S256", "S1"])
def test_clevis_with_pinned_thumbprint(keys: Path, tmp_path: Path, hash_name: str) -> None:
    signing, _ = load_keys(keys)
    with our_server(keys, tmp_path / "log", workers=2) as server:
        jwe = encrypt(server.url, b"pinned", thp=thumbprint(signing, hash_name))
        assert decrypt(jwe).stdout == b"pinned"
        wrong = encrypt_fails(server.url, thp=thumbprint(client_key()))
    assert wrong != 0  # a thumbprint the server does not hold is refused by clevis


def encrypt_fails(url: str, **config: str) -> int:
    pin = json.dumps({"url": url, **config})
    return subprocess.run(["clevis", "encrypt", "tang", pin], input=b"x", capture_output=True, timeout=60).returncode


def test_decrypt_fails_once_the_key_is_gone(keys: Path, tmp_path: Path) -> None:
    """The oracle can fail: with the exchange key deleted, the same JWE no longer decrypts."""
    port = free_port()
    command = serve_command(keys, port, "--no-auto-keygen")
    with running(command, port, tmp_path / "log1") as server:
        jwe = encrypt(server.url, b"gone")
    _, exchange = load_keys(keys)
    for path in keys.glob("*.jwk"):
        if json.loads(path.read_text()) == exchange:
            path.unlink()
    with running(command, port, tmp_path / "log2"):
        assert decrypt(jwe).returncode != 0


def test_reference_keys_and_cross_decryption(reference_keys: Path, tmp_path: Path) -> None:
    """A JWE bound against the reference decrypts against ours on the same keys, and the other way round."""
    port = free_port()
    ours = [str(BIN / "tang-server"), "serve", "--keys-dir", str(reference_keys), "--port", str(port)]
    reference = [
        "socat",
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
        f"EXEC:/usr/libexec/tangd {reference_keys}",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(reference, port, tmp_path / "ref1"):
        from_reference = encrypt(url, b"made with the reference")
    with running(ours, port, tmp_path / "ours"):
        assert decrypt(from_reference).stdout == b"made with the reference"
        from_ours = encrypt(url, b"made with ours")
    with running(reference, port, tmp_path / "ref2"):
        assert decrypt(from_ours).stdout == b"made with ours"


def _jose_exchange(client: Path, server_key: dict[str, object], tmp_path: Path) -> bytes:
    """What the reference computes: `jose_jwk_exc(server key, client key)`.

    The local key (-l) must be the server's private key: with a public-only local key, jose's ECMR exchange
    adds the two points instead (the step clevis uses for x = c + e), so the operand order matters.
    """
    server_file = tmp_path / "server.jwk"
    server_file.write_text(json.dumps(server_key))
    command = [
        "jose",
        "jwk",
        "exc",
        "-i",
        '{"alg":"ECMR","key_ops":["deriveKey"]}',
        "-l",
        str(server_file),
        "-r",
        str(client),
    ]
    return subprocess.run(command, check=True, capture_output=True).stdout


@pytest.mark.parametrize("hidden", [False, True])
def test_rec_is_byte_identical_to_jose(reference_keys: Path, tmp_path: Path, hidden: bool) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    for path in reference_keys.glob("*.jwk"):
        (directory / (f".{path.name}" if hidden else path.name)).write_bytes(path.read_bytes())
    _, exchange = load_keys(directory)
    with our_server(directory, tmp_path / "log", "--no-auto-keygen") as server:
        for hash_name in HASHES:
            client = client_key()
            client_file = tmp_path / "client.jwk"
            client_file.write_text(json.dumps(client))
            body = json.dumps(client).encode() + b"\n"  # clevis sends a trailing newline
            response = request(server.port, "POST", f"/rec/{thumbprint(exchange, hash_name)}", body)
            assert response.status == 200
            assert response.body == _jose_exchange(client_file, exchange, tmp_path)
            assert len(response.body) == 253


def test_show_keys_matches_reference_tool(keys: Path, tmp_path: Path) -> None:
    signing, _ = load_keys(keys)
    with our_server(keys, tmp_path / "log") as server:
        ours = subprocess.run([str(BIN / "tang-server"), "show-keys", server.url], capture_output=True, text=True)
        theirs = subprocess.run(["tang-show-keys", str(server.port)], capture_output=True, text=True)
    assert ours.stdout.split() == [thumbprint(signing)]
    assert theirs.returncode == 0
    assert theirs.stdout.split() == ours.stdout.split()


def test_reference_server_fixture_serves(reference_keys: Path, tmp_path: Path) -> None:
    with reference_server(reference_keys, tmp_path / "log") as server:
        assert request(server.port, "GET", "/adv").status == 200


def test_check_command_performs_a_real_recovery(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", workers=2) as server:
        result = subprocess.run([str(BIN / "tang-server"), "check", server.url, "--rounds", "5"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 recoveries" in result.stdout


def test_check_command_fails_against_a_wrong_server(keys: Path, tmp_path: Path) -> None:
    """The check can fail: a server holding a different exchange key than it advertises answers 403."""
    signing, exchange = load_keys(keys)
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    keyfiles.write_key(impostor, "sig.jwk", signing)
    keyfiles.write_key(impostor, "exc.jwk", {k: v for k, v in exchange.items() if k != "d"})  # cannot answer
    with our_server(impostor, tmp_path / "log", "--no-auto-keygen") as server:
        result = subprocess.run([str(BIN / "tang-server"), "check", server.url], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "FAILED" in result.stderr


def test_check_detects_a_wrong_recovery(keys: Path) -> None:
    """A server answering /rec with the wrong scalar is caught by the unblinding step (K' != K)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tang_server._native import ExchangeKey
    from tang_server.keys import b64
    from tang_server.keys.keyset import load_keyset
    from tang_server.ops.check import CheckFailed, check

    advertisement = load_keyset(keys).default_advertisement
    wrong = keyfiles.generate_pair()[1]
    wrong_key = ExchangeKey(*(b64.decode(wrong[m]) for m in ("d", "x", "y")))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            assert advertisement is not None
            self.reply(advertisement)

        def do_POST(self) -> None:
            posted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            x, y = wrong_key.exchange(b64.decode(posted["x"]), b64.decode(posted["y"]))
            self.reply(json.dumps({"x": b64.encode(x), "y": b64.encode(y)}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CheckFailed, match="wrong key"):
            check(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
