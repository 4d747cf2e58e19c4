"""A key directory moves from our server to the reference after our rotations: every JWE bound before keeps
decrypting through the reference `tangd`, which advertises exactly our newest pair."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tang_server.keys import b64

from .oracles import jose_thumbprint, key_files
from .support import BIN, REFERENCE_TANGD, free_port, request, require_tools, running, serve_command


def _encrypt(url: str, secret: bytes) -> bytes:
    pin = json.dumps({"url": url})
    command = ["clevis", "encrypt", "tang", pin, "-y"]
    return subprocess.run(command, input=secret, capture_output=True, check=True, timeout=60).stdout


def _decrypt(jwe: bytes) -> bytes:
    result = subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rotate(*args: str) -> None:
    subprocess.run([str(BIN / "tang-server"), "rotate", *args], check=True, capture_output=True, timeout=60)


def test_reference_serves_a_directory_rotated_by_our_commands(keys: Path, tmp_path: Path) -> None:
    """One URL throughout (a JWE names its server's URL): ours, then the reference, on the same port."""
    require_tools("clevis", "jose", "socat", "tang-show-keys", str(REFERENCE_TANGD))
    port = free_port()
    ours = serve_command(keys, port, "--no-auto-keygen")
    reference = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{REFERENCE_TANGD} {keys}"]
    with running(ours, port, tmp_path / "ours1") as server:
        first = _encrypt(server.url, b"bound to the first pair")
    _rotate(str(keys))  # single-host rotation
    with running(ours, port, tmp_path / "ours2") as server:
        second = _encrypt(server.url, b"bound to the second pair")
    _rotate("--stage", str(keys))  # two-phase rotation
    _rotate("--promote", str(keys))
    files = key_files(keys)
    assert len(files) == 6 and len([name for name in files if name.startswith(".")]) == 4
    newest = {jose_thumbprint(key) for name, key in files.items() if not name.startswith(".")}

    with running(reference, port, tmp_path / "reference") as server:
        assert _decrypt(first) == b"bound to the first pair"
        assert _decrypt(second) == b"bound to the second pair"
        third = _encrypt(server.url, b"bound through the reference")
        assert _decrypt(third) == b"bound through the reference"
        shown = subprocess.run(["tang-show-keys", str(port)], capture_output=True, text=True, timeout=60)
        advertisement = request(port, "GET", "/adv")
    signing = [key for name, key in files.items() if not name.startswith(".") and "sign" in str(key["key_ops"])]
    assert shown.returncode == 0 and shown.stdout.split() == [jose_thumbprint(signing[0])]
    payload = json.loads(b64.decode(json.loads(advertisement.body)["payload"]))
    assert {jose_thumbprint(key) for key in payload["keys"]} == newest
