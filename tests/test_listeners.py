"""Where the server listens: `--uds`, `--host`, and `tangd -l` on every address, as the kernel reports it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from .listening import connectable, kernel_listeners, launched
from .support import BIN, client_key, load_keys, parse_response, serve_command, thumbprint


def _over_unix_socket(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_uds_serves_the_protocol_on_a_unix_socket_only(keys: Path, tmp_path: Path) -> None:
    path = tmp_path / "tang.sock"
    log = tmp_path / "log"
    command = [str(BIN / "tang-server"), "serve", "--keys-dir", str(keys), "--uds", str(path)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        answer = b""
        for _ in range(400):  # bounds a hang: about 20 s
            if path.exists():
                try:
                    answer = _over_unix_socket(path, b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    break
                except ConnectionRefusedError:
                    pass
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        assert parse_response(answer).status == 200
        _, exchange = load_keys(keys)
        body = json.dumps(client_key()).encode()
        rec = (f"POST /rec/{thumbprint(exchange)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body  # fmt: skip
        assert parse_response(_over_unix_socket(path, rec)).status == 200
        # The kernel's view: a listening Unix socket at the path, no TCP listener at all (not even the default).
        listeners = kernel_listeners(process.pid)
        assert f"unix {path}" in listeners
        assert not [entry for entry in listeners if entry.startswith("tcp ")]
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0


def test_host_binds_only_that_address(keys: Path, tmp_path: Path) -> None:
    def command(port: int) -> list[str]:
        return serve_command(keys, port, "--host", "127.0.0.2")

    with launched(command, tmp_path / "log", host="127.0.0.2") as server:
        tcp = {entry for entry in kernel_listeners(server.process.pid) if entry.startswith("tcp ")}
        assert tcp == {f"tcp 127.0.0.2:{server.port}"}
        assert not connectable("127.0.0.1", server.port)
        with socket.create_connection(("127.0.0.2", server.port), timeout=10) as conn:
            conn.sendall(b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(12) == b"HTTP/1.1 200"


def _other_local_address() -> str | None:
    """An address of this machine outside 127.0.0.0/8, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_tangd_listens_on_every_address(keys: Path, tmp_path: Path) -> None:
    def command(port: int) -> list[str]:
        return [str(BIN / "tangd"), "-l", "-p", str(port), str(keys)]

    with launched(command, tmp_path / "log") as server:
        listeners = kernel_listeners(server.process.pid)
        assert listeners & {f"tcp 0.0.0.0:{server.port}", f"tcp :::{server.port}"}, listeners
        addresses = ["127.0.0.1", "127.0.0.2", "127.255.0.9"]
        other = _other_local_address()
        if other is not None:
            addresses.append(other)
        for address in addresses:
            with socket.create_connection((address, server.port), timeout=10) as conn:
                conn.sendall(b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert conn.recv(12) == b"HTTP/1.1 200", address
