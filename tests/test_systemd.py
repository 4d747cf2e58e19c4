"""systemd hosts: sockets passed by socket activation, readiness and stopping told through NOTIFY_SOCKET, SIGHUP.

`systemd-socket-activate` (Debian's systemd package) passes listening sockets exactly as systemd does
(LISTEN_FDS, LISTEN_PID, descriptors from 3) and execs the service when the first connection arrives; the test
plays the service manager's notification socket itself. No systemd needs to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tang_server.keys import keyfiles

from .support import BIN, free_port, thumbprint

DEADLINE = 60.0  # bounds a hang, never a speed


@dataclass
class Activated:
    process: subprocess.Popen[bytes]
    notifications: socket.socket
    log: Path

    def message(self) -> dict[str, str]:
        """The next notification, as its assignments."""
        data = self.notifications.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())


@contextlib.contextmanager
def activated(tmp_path: Path, listen: list[str], *serve_args: str) -> Iterator[Activated]:
    notify_path = tmp_path / "notify"
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(str(notify_path))
    notifications.settimeout(DEADLINE)
    listening = [arg for address in listen for arg in ("-l", address)]
    command = ["systemd-socket-activate", *listening, "-E", f"NOTIFY_SOCKET={notify_path}",
               str(BIN / "tang-server"), "serve", "--port", "1", "--drain-seconds", "0.5", *serve_args]  # fmt: skip
    log = tmp_path / "log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    try:
        yield Activated(process, notifications, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notifications.close()


def _connect(address: str) -> socket.socket:
    """Connect to a TCP HOST:PORT or a Unix socket path, retrying until systemd-socket-activate listens."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            if address.startswith("/"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                except OSError:
                    sock.close()
                    raise
                return sock
            host, port = address.rsplit(":", 1)
            return socket.create_connection((host, int(port)))
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {address}"
            time.sleep(0.05)


def _get(address: str, path: str) -> tuple[int, bytes]:
    with _connect(address) as sock:
        sock.settimeout(DEADLINE)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _advertised(address: str) -> set[str]:
    status, body = _get(address, "/adv")
    assert status == 200
    payload = json.loads(_b64(json.loads(body)["payload"]))
    return {thumbprint(key) for key in payload["keys"]}


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _clevis_round_trip(port: int) -> None:
    config = json.dumps({"url": f"http://127.0.0.1:{port}"})
    encrypted = subprocess.run(["clevis", "encrypt", "tang", config, "-y"], input=b"systemd", capture_output=True,
                               check=True, timeout=DEADLINE).stdout  # fmt: skip
    decrypted = subprocess.run(
        ["clevis", "decrypt"], input=encrypted, capture_output=True, check=True, timeout=DEADLINE
    )
    assert decrypted.stdout == b"systemd"


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activated_serve_reports_ready_then_stopping(tmp_path: Path, workers: int) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    with activated(tmp_path, [address], "--keys-dir", str(tmp_path / "keys"), "--workers", str(workers)) as service:
        # The first connection makes systemd-socket-activate exec the service; it waits in the passed socket.
        first = _connect(address)
        first.sendall(b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ready = service.message()
        assert ready["READY"] == "1"
        assert int(ready["MAINPID"]) == service.process.pid  # exec'd in place: the pid systemd would watch
        status, body = _get(address, "/status")
        assert status == 200
        assert ready["STATUS"] == f"serving key set {json.loads(body)['digest']}"
        first.settimeout(DEADLINE)
        assert first.recv(12) == b"HTTP/1.1 200"
        first.close()
        _clevis_round_trip(port)
        service.process.send_signal(signal.SIGTERM)
        assert service.message()["STOPPING"] == "1"
        assert service.process.wait(DEADLINE) == 0


def test_ready_only_once_the_keys_are_loaded(tmp_path: Path) -> None:
    """A key file that is a FIFO holds the first read of the directory until the test writes the key into it."""
    keys = tmp_path / "keys"
    keys.mkdir()
    signing, exchange = keyfiles.generate_pair()
    keyfiles.write_key(keys, keyfiles.key_file_name(signing), signing)
    fifo = keys / keyfiles.key_file_name(exchange)
    os.mkfifo(fifo)
    port = free_port()
    address = f"127.0.0.1:{port}"
    # One worker: two would both read the one FIFO and split its bytes between them.
    serve = ["--keys-dir", str(keys), "--no-auto-keygen", "--workers", "1"]
    with activated(tmp_path, [address], *serve) as service:
        trigger = _connect(address)
        deadline = time.monotonic() + DEADLINE
        while True:  # opening a FIFO's write end without blocking succeeds only once a reader has it open
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server never started reading its keys"
                assert service.process.poll() is None, service.log.read_text()
                time.sleep(0.05)
        service.notifications.setblocking(False)
        with pytest.raises(BlockingIOError):
            service.notifications.recv(4096)  # reading the keys, not ready yet
        service.notifications.settimeout(DEADLINE)
        data = json.dumps(exchange).encode()
        os.write(writer, data)
        os.close(writer)
        assert service.message()["READY"] == "1"
        # Later reads of the directory (the write above was an event) get the key too. Only from now on: a feeder
        # opening the FIFO while the first reader still has it open would append a second copy to its read.
        with _feeding(fifo, data):
            assert _advertised(address) == {thumbprint(signing), thumbprint(exchange)}
            trigger.close()
            service.process.send_signal(signal.SIGTERM)
            assert service.message()["STOPPING"] == "1"
            assert service.process.wait(DEADLINE) == 0


@contextlib.contextmanager
def _feeding(fifo: Path, data: bytes) -> Iterator[None]:
    """Give `data` to every reader of `fifo` until the end of the block."""
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            fd = os.open(fifo, os.O_WRONLY)  # waits for a reader
            with contextlib.suppress(BrokenPipeError):
                os.write(fd, data)
            os.close(fd)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield
    finally:
        stop.set()
        release = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets a feeder waiting for a reader finish
        feeder.join(DEADLINE)
        os.close(release)


def test_several_passed_sockets_tcp_and_unix(tmp_path: Path) -> None:
    tcp = f"127.0.0.1:{free_port()}"
    unix = str(tmp_path / "tang.sock")
    with activated(tmp_path, [tcp, unix], "--keys-dir", str(tmp_path / "keys"), "--workers", "2") as service:
        trigger = _connect(unix)
        assert service.message()["READY"] == "1"
        assert _advertised(tcp) == _advertised(unix)
        assert len(_advertised(unix)) == 2
        trigger.close()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(DEADLINE) == 0
    assert "LISTEN_FDS" not in service.log.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rereads_what_inotify_cannot_see(tmp_path: Path, workers: int) -> None:
    """Visible names are symlinks into another directory, whose files change without an event in ours."""
    elsewhere, keys = tmp_path / "elsewhere", tmp_path / "keys"
    elsewhere.mkdir()
    keys.mkdir()
    signing, exchange = keyfiles.generate_pair()
    for key in (signing, exchange):
        name = keyfiles.key_file_name(key)
        (elsewhere / name).write_text(json.dumps(key))
        (keys / name).symlink_to(elsewhere / name)
    address = f"127.0.0.1:{free_port()}"
    serve = ["--keys-dir", str(keys), "--no-auto-keygen", "--recheck-seconds", "3600", "--workers", str(workers)]
    with activated(tmp_path, [address], *serve) as service:
        trigger = _connect(address)
        assert service.message()["READY"] == "1"
        trigger.close()
        assert thumbprint(signing) in _advertised(address)
        replacement, _ = keyfiles.generate_pair()
        (elsewhere / "tmp").write_text(json.dumps(replacement))
        os.rename(elsewhere / "tmp", elsewhere / keyfiles.key_file_name(signing))  # no event in the watched directory
        assert thumbprint(replacement) not in _advertised(address)
        service.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + DEADLINE
        in_a_row = 0
        while in_a_row < 8 * workers:  # every worker re-read it, not just one (each answer comes from either)
            in_a_row = in_a_row + 1 if thumbprint(replacement) in _advertised(address) else 0
            assert time.monotonic() < deadline, "SIGHUP did not re-read the directory in every worker"
            assert service.process.poll() is None, "SIGHUP stopped the server"
        assert service.process.poll() is None
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(DEADLINE) == 0
