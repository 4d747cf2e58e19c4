"""The test harness's own promises: a server is started on its port even when another program holds the port for
a while, and a listener that is not the server's is never taken for it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .support import free_port, listens, request, running, serve_command, wait_accepted

DEADLINE = 30.0  # bounds waits for things that happen in milliseconds


def test_a_port_held_by_another_program_is_waited_out(keys: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "log"
    squatter = socket.create_server(("127.0.0.1", port))  # listens, never answers
    collided = threading.Event()

    def release_after_a_collision() -> None:
        deadline = time.monotonic() + DEADLINE
        while "address already in use" not in (log.read_text().lower() if log.exists() else ""):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        else:
            collided.set()
        squatter.close()

    thread = threading.Thread(target=release_after_a_collision)
    thread.start()
    try:
        with running(serve_command(keys, port), port, log) as server:
            assert listens(server.process, port)
            assert request(port, "GET", "/adv").status == 200
    finally:
        thread.join()
        squatter.close()
    assert collided.is_set()  # the first start did collide: the retry was exercised


def test_another_programs_listener_is_not_the_server(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)
        try:
            assert not listens(unrelated, port)
        finally:
            unrelated.kill()
            unrelated.wait()
    with running(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", "-"], port, tmp_path / "log") as server:
        assert listens(server.process, port)  # the same check, on a listener of its own


def test_wait_accepted_sees_connections_left_in_the_listen_queue() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            wait_accepted(port, 3, timeout=DEADLINE)
            clients.append(socket.create_connection(("127.0.0.1", port)))  # left in the queue
            with pytest.raises(AssertionError, match="waiting to be accepted"):
                wait_accepted(port, 4, timeout=1.0)
        finally:
            for conn in clients + accepted:
                conn.close()
