"""`tangd`, the reference-compatible command line, run as real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tang_server import tangd

from .support import (
    BIN,
    client_key,
    free_port,
    load_keys,
    parse_response,
    request,
    require_tools,
    running,
    thumbprint,
)

TANGD = str(BIN / "tangd")


def test_listen_with_options_before_or_after_directory(keys: Path, tmp_path: Path) -> None:
    for arrangement in (
        ["-l", "-p", "{port}", "{dir}"],
        ["{dir}", "-l", "-p", "{port}"],
        ["-p", "{port}", "{dir}", "-l"],
    ):
        port = free_port()
        argv = [a.format(port=port, dir=keys) for a in arrangement]
        with running([TANGD, *argv], port, tmp_path / "log") as server:
            assert request(server.port, "GET", "/adv").status == 200


def test_default_port_is_9090() -> None:
    assert tangd.parser().parse_intermixed_args(["-l", "/keys"]).port == 9090


def test_endpoint_option(keys: Path, tmp_path: Path) -> None:
    port = free_port()
    with running([TANGD, "-l", "-p", str(port), "-e", "tang", str(keys)], port, tmp_path / "log") as server:
        assert request(server.port, "GET", "/tang/adv").status == 200
        assert request(server.port, "GET", "/adv").status == 404


@pytest.mark.parametrize("port", ["-1", "0", "65536", "http"])
def test_invalid_port_exits_non_zero(keys: Path, port: str) -> None:
    result = subprocess.run([TANGD, "-l", "-p", port, str(keys)], capture_output=True, timeout=30)
    assert result.returncode != 0


def test_missing_directory_exits_non_zero(tmp_path: Path) -> None:
    result = subprocess.run([TANGD, "-l", "-p", str(free_port()), str(tmp_path / "nope")], capture_output=True)
    assert result.returncode != 0


def test_sigterm_exits_cleanly(keys: Path, tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "log").open("wb") as log:
        process = subprocess.Popen([TANGD, "-l", "-p", str(port), str(keys)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if request(port, "GET", "/adv").status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()


def test_one_connection_on_stdin_pipes(keys: Path) -> None:
    """Without -l: one HTTP connection on standard input and output (here plain pipes)."""
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    data = (
        f"GET /adv HTTP/1.1\r\nHost: x\r\n\r\n"
        f"POST /rec/{thumbprint(exchange)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = subprocess.run([TANGD, str(keys)], input=data, capture_output=True, timeout=30)
    assert result.returncode == 0
    first, _, rest = result.stdout.partition(b"HTTP/1.1 ")
    responses = [parse_response(b"HTTP/1.1 " + part) for part in rest.split(b"HTTP/1.1 ") if part]
    assert first == b""
    assert [r.status for r in responses] == [200, 200]  # both answered, keep-alive on one connection


def test_socat_socket_activation_with_clevis(keys: Path, tmp_path: Path) -> None:
    """As Debian users run the reference: socat accepts, tangd serves the connection on its stdin socket."""
    require_tools("socat", "clevis")
    port = free_port()
    command = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{TANGD} {keys}"]
    with running(command, port, tmp_path / "log"):
        pin = json.dumps({"url": f"http://127.0.0.1:{port}"})
        jwe = subprocess.run(
            ["clevis", "encrypt", "tang", pin, "-y"],
            input=b"socat",
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60).stdout == b"socat"
