"""`tangd` in inetd mode hands its connection to a running `tang-server serve` for the same keys, else serves it.

The launchers are the real ones: `systemd-socket-activate -a --inetd` (what a systemd `Accept=yes` unit does: the
TCP connection as standard input and output, one process per connection) and `socat ... EXEC:` (one end of a
socket pair). Which process served a request is read from the access logs: the server's own log, and the
launcher's, which holds the standard error of every `tangd` it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from .support import (
    BIN,
    REFERENCE_TANGD,
    Server,
    client_key,
    free_port,
    load_keys,
    our_server,
    parse_response,
    running,
    serve_command,
    thumbprint,
)
from .test_systemd import _clevis_round_trip

DEADLINE = 60.0  # bounds a hang, never a speed
TANGD = str(BIN / "tangd")
ADV = b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _launcher(kind: str, keys: Path, port: int) -> list[str]:
    if kind == "systemd-socket-activate":
        return ["systemd-socket-activate", "-a", "--inetd", "-l", f"127.0.0.1:{port}", TANGD, str(keys)]
    return ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{TANGD} {keys}"]


@contextlib.contextmanager
def _launched(kind: str, keys: Path, log: Path) -> Iterator[Server]:
    port = free_port()
    with running(_launcher(kind, keys, port), port, log) as launcher:
        yield launcher


@contextlib.contextmanager
def _maybe_server(running_server: bool, keys: Path, log: Path) -> Iterator[Server | None]:
    if not running_server:
        yield None
        return
    with our_server(keys, log, "--drain-seconds", "0.5") as server:
        _wait_for(lambda: _control_socket(server) is not None, "the server never offered hand-overs")
        yield server


def _control_socket(server: Server) -> Path | None:
    """Where the server says it takes connections from tangd (its own log, not our computation)."""
    found = re.search(r"taking connections from tangd on (\S+)", server.log_text())
    return Path(found.group(1)) if found else None


def _wait_for(condition: object, message: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def _recoveries(log: Path) -> int:
    return len(re.findall(r'"POST /rec/\S+ HTTP/1\.1" 200 ', log.read_text(errors="replace")))


def _adv(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
        conn.sendall(ADV)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("kind", ["systemd-socket-activate", "socat"])
@pytest.mark.parametrize("with_server", [True, False], ids=["server-running", "server-absent"])
def test_clevis_round_trip_through_inetd_launchers(keys: Path, tmp_path: Path, kind: str, with_server: bool) -> None:
    server_log, launcher_log = tmp_path / "server.log", tmp_path / "launcher.log"
    with _maybe_server(with_server, keys, server_log) as server, _launched(kind, keys, launcher_log) as launcher:
        _clevis_round_trip(launcher.port)
        if server is not None:
            # The server answered the recovery (its log shows it; its access log is flushed within 0.2 s) ...
            _wait_for(lambda: _recoveries(server_log) == 1, "the running server did not serve the recovery")
        else:
            _wait_for(lambda: _recoveries(launcher_log) == 1, "tangd did not serve the recovery")
    # ... and tangd did not, which has nothing of its own to log when it hands over.
    assert _recoveries(launcher_log) == (0 if with_server else 1), launcher_log.read_text()


def test_control_socket_is_0600_where_the_documented_rule_puts_it(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "server.log") as server:
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        path = _control_socket(server)
        assert path is not None
        status = os.stat(path)
        assert stat.S_ISSOCK(status.st_mode)
        assert stat.S_IMODE(status.st_mode) == 0o600
        digest = hashlib.sha256(os.fsencode(os.path.realpath(keys))).hexdigest()[:32]
        runtime = "/run/tang-server" if os.geteuid() == 0 else None
        assert path.name == f"handoff-{digest}.sock"
        if runtime is not None and "RUNTIME_DIRECTORY" not in os.environ:
            assert str(path.parent) == runtime
    assert not path.exists(), "a stopped server leaves its control socket behind"


def test_stale_socket_file_falls_back_to_serving_locally(keys: Path, tmp_path: Path) -> None:
    """A server killed with SIGKILL leaves its socket file: tangd must serve the connection itself, at once."""
    port = free_port()
    with running(serve_command(keys, port), port, tmp_path / "server.log") as server:
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        path = _control_socket(server)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(DEADLINE)
    assert path is not None and path.exists(), "the test needs the stale file a killed server leaves"
    launcher_log = tmp_path / "launcher.log"
    with _launched("systemd-socket-activate", keys, launcher_log) as launcher:
        answer = parse_response(_adv(launcher.port))
        assert answer.status == 200
        _clevis_round_trip(launcher.port)
        _wait_for(lambda: _recoveries(launcher_log) == 1, "tangd did not serve the recovery itself")
    path.unlink()


def test_socket_of_another_key_directory_is_refused(keys: Path, tmp_path: Path) -> None:
    """A server for other keys must not answer for these: tangd pointed at its socket serves the keys it was given."""
    other = tmp_path / "other"
    subprocess.run([str(BIN / "tang-server"), "keygen", str(other)], check=True, capture_output=True)
    with our_server(other, tmp_path / "server.log") as server:
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        env = dict(os.environ, TANG_HANDOFF_SOCKET=str(_control_socket(server)))
        port = free_port()
        command = _launcher("systemd-socket-activate", keys, port)
        command[1:1] = ["-E", "TANG_HANDOFF_SOCKET"]  # passed on to tangd
        with running(command, port, tmp_path / "launcher.log", env=env) as launcher:
            body = json.loads(parse_response(_adv(launcher.port)).body)
    advertised = json.loads(_b64decode(body["payload"]))["keys"]
    signing, exchange = load_keys(keys)
    assert {thumbprint(key) for key in advertised} == {thumbprint(signing), thumbprint(exchange)}


def _b64decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_no_request_lost_while_the_server_stops(keys: Path, tmp_path: Path) -> None:
    """SIGTERM while connections keep arriving: each one is answered, by the server or by tangd itself."""
    launcher_log = tmp_path / "launcher.log"
    answers: list[int] = []
    failures: list[str] = []
    with our_server(keys, tmp_path / "server.log", "--drain-seconds", "0.3") as server:
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        with _launched("systemd-socket-activate", keys, launcher_log) as launcher:

            def client() -> None:
                for _ in range(12):
                    try:
                        answers.append(parse_response(_adv(launcher.port)).status)
                    except (OSError, ValueError, IndexError) as exc:
                        failures.append(repr(exc))

            clients = [threading.Thread(target=client) for _ in range(3)]
            for thread in clients:
                thread.start()
            _wait_for(lambda: len(answers) >= 6, "no answers before the signal")
            server.process.send_signal(signal.SIGTERM)
            for thread in clients:
                thread.join(DEADLINE)
            assert server.process.wait(DEADLINE) == 0
    assert failures == []
    assert answers == [200] * 36


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a stream of HTTP/1.1 responses framed by Content-Length."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        response = parse_response(head + b"\r\n\r\n")
        length = int(response.headers.get("content-length", "0"))
        found.append((response.status, rest[:length]))
        data = rest[length:]
    return found


def test_plain_requests_served_without_a_server_match_the_full_server_and_the_reference(
    reference_keys: Path,
) -> None:
    """Without a server, tangd answers what clevis sends without starting the full server: the bytes must be the
    full server's (which takes the whole connection when an operational route comes first), and the statuses and
    recovery bodies the reference's."""
    signing, exchange = load_keys(reference_keys)
    kid = thumbprint(exchange)

    def rec(target: str, body: bytes, close: bool = False) -> bytes:
        connection = "Connection: close\r\n" if close else ""
        return f"POST {target} HTTP/1.1\r\nHost: x\r\n{connection}Content-Length: {len(body)}\r\n\r\n".encode() + body

    valid = json.dumps(client_key()).encode()
    plain = (
        rec(f"/rec/{kid}", valid)
        + rec(f"/rec/{kid}", b"{")
        + f"GET /adv/{kid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()  # an exchange key's id: no such advertisement
        + rec(f"/rec/{thumbprint(signing)}", valid)  # a signing key cannot recover
        + rec("/rec/unknown", valid, close=True)
    )
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    def run(command: list[str], data: bytes) -> bytes:
        result = subprocess.run(command, input=data, capture_output=True, timeout=DEADLINE, check=True)
        return result.stdout

    lean = run([TANGD, str(reference_keys)], plain)
    full = run([TANGD, str(reference_keys)], health + plain)
    first, _, _ = full.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert lean == full[full.index(b"HTTP/1.1 ", 1) :]
    reference = run([str(REFERENCE_TANGD), str(reference_keys)], plain)
    ours = _responses(lean)
    assert [status for status, _ in ours] == [200, 400, 404, 403, 404]
    assert ours == _responses(reference)


def test_sigterm_ends_a_waiting_connection_with_status_0(keys: Path) -> None:
    """systemd stops a per-connection unit with SIGTERM: tangd (no server) waiting for a request exits with 0."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        process = subprocess.Popen([TANGD, str(keys)], stdin=theirs.fileno(), stdout=theirs.fileno())
        ours.sendall(b"GET /adv HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive: tangd waits for the next request
        ours.settimeout(DEADLINE)
        assert ours.recv(12) == b"HTTP/1.1 200"
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0


def test_values_the_one_shot_path_repeats_agree_with_the_server() -> None:
    """oneshot.py repeats a few settings defaults, content types and the Tang routes rather than import the modules
    that define them (settings, http): they must be the server's."""
    from tang_server.http import responses
    from tang_server.serving import oneshot
    from tang_server.settings import Settings

    defaults = Settings(keys_dir=Path("."))
    assert defaults.request_timeout == oneshot.REQUEST_TIMEOUT
    assert defaults.keep_alive_seconds == oneshot.KEEP_ALIVE_SECONDS
    assert defaults.max_header_bytes == oneshot.MAX_HEADER_BYTES
    assert defaults.max_body_bytes == oneshot.MAX_BODY_BYTES
    assert defaults.max_target_bytes == oneshot.MAX_TARGET_BYTES
    assert oneshot.ADVERTISEMENT_TYPE == responses.ADVERTISEMENT_TYPE
    assert oneshot.RECOVERY_TYPE == responses.RECOVERY_TYPE
    for status, phrase in oneshot._PHRASES.items():
        assert phrase == HTTPStatus(status).phrase.encode()


@pytest.mark.parametrize("prefix", ["", "tang", "/tang/", "a.b", "x+y"])
def test_one_shot_routing_is_the_route_tables(prefix: str) -> None:
    """A request the one-shot path answers is one the full route table sends to the same Tang route with the same
    key id; every other request goes to the full server (Unusual)."""
    from tang_server.http.routing import route_table
    from tang_server.serving import oneshot
    from tang_server.settings import Settings

    table = route_table(Settings(keys_dir=Path("."), prefix=prefix))
    routes = oneshot.tang_routes(prefix)
    under = [f"/{prefix.strip('/')}", f"//{prefix.strip('/')}/"] if prefix.strip("/") else [""]
    paths = ["/adv", "/adv/", "//adv//", "/adv/abc_-9", "/adv//abc", "/rec/abc", "//rec//abc", "/rec", "/rec/",
             "/rec/a b", "/adv/a?x", "/adv?x", "/healthz", "/readyz", "/metrics", "/status", "/", "/advx",
             "/rec/é"]  # fmt: skip
    targets = [(base + path).encode() for base in [*under, "", "/other"] for path in paths]
    targets += [b"/adv/" + b"a" * 5000, b"/rec/" + b"b" * 4090]
    for method in ("GET", "POST", "PUT"):
        for target in targets:
            match = table.dispatch(method, target)
            tang = match.route is not None and match.route.tang and len(target) < Settings.max_target_bytes
            try:
                thp = oneshot.dispatch(routes, method, target)
            except oneshot.Unusual:
                assert not tang, (method, target)
            else:
                assert tang, (method, target)
                assert thp == match.thp, (method, target)


_HEAVY = {"argparse", "asyncio", "dataclasses", "hashlib", "http", "inspect", "logging", "pathlib", "typing",
          "tang_server.settings", "tang_server.http", "uvicorn", "starlette", "jwcrypto", "cryptography"}  # fmt: skip


def _modules_after_main(keys: Path, stdin: int | None, data: bytes = b"") -> set[str]:
    """The modules `tangd DIR` has imported once it is done with its connection (in a child interpreter)."""
    code = (
        "import sys\n"  # what the installed launcher (packaging/wheel-data/scripts/tangd) imports first
        "from tang_server import tangd\n"
        f"status = tangd.main([{str(keys)!r}])\n"
        "print('MODULES', *sorted(sys.modules), file=sys.stderr)\n"
    )
    # Without the suite's coverage hook, which imports much of this list itself at interpreter start.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE_PROCESS_")}
    result = subprocess.run(
        [str(BIN / "python"), "-c", code], stdin=stdin, input=None if stdin is not None else data,
        capture_output=True, timeout=DEADLINE, env=environment,
    )  # fmt: skip
    found = [line.split()[1:] for line in result.stderr.decode().splitlines() if line.startswith("MODULES ")]
    assert result.returncode == 0 and len(found) == 1, result.stderr
    return set(found[0])


def test_one_shot_path_imports_only_what_the_connection_needs(keys: Path) -> None:
    """Every module is paid for by every connection: the settings, the HTTP layer, dataclasses, logging, pathlib,
    typing and hashlib (OpenSSL) stay unimported while tangd answers `GET /adv` and `POST /rec` itself."""
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    head = f"POST /rec/{thumbprint(exchange)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    rec = head.encode() + body
    warm = _modules_after_main(keys, None, ADV)  # the first connection after a key change signs (jwcrypto)
    assert "tang_server.serving.oneshot" in warm
    modules = _modules_after_main(keys, None, b"GET /adv HTTP/1.1\r\nHost: x\r\n\r\n" + rec + ADV)
    assert "tang_server.keys.recovery" in modules
    assert {name for name in modules if name.split(".")[0] in _HEAVY or name in _HEAVY} <= {"http"}  # /rec's status


def test_hand_over_imports_nothing_but_the_hand_over(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "server.log") as server:
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        ours, theirs = socket.socketpair()  # as `socat ... EXEC:` gives tangd its connection
        with ours, theirs:
            ours.sendall(ADV)
            modules = _modules_after_main(keys, theirs.fileno())
            theirs.close()
            assert parse_response(_read_all(ours)).status == 200
        assert "hand-over" not in server.log_text()  # not refused
    imported = {name for name in modules if name.startswith("tang_server")}
    assert imported == {"tang_server", "tang_server.serving", "tang_server.serving.handoff", "tang_server.tangd"}
    assert not {name for name in modules if name.split(".")[0] in _HEAVY}


def _read_all(conn: socket.socket) -> bytes:
    conn.settimeout(DEADLINE)
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_socat_keeps_relaying_a_handed_over_connection(keys: Path, tmp_path: Path) -> None:
    """socat stops relaying once its EXEC child exits: a tangd that handed its socket pair's end over must live
    until the server is done with the connection, or the answer is lost (kept-alive requests, as curl sends)."""
    with (
        our_server(keys, tmp_path / "server.log") as server,
        _launched("socat", keys, tmp_path / "launcher.log") as launcher,
    ):
        _wait_for(lambda: _control_socket(server) is not None, "no control socket announced")
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", launcher.port), timeout=DEADLINE) as conn:
                conn.sendall(b"GET /adv HTTP/1.1\r\nHost: x\r\n\r\n")
                assert parse_response(_one_response(conn)).status == 200
    assert _recoveries(tmp_path / "launcher.log") == 0
    assert '"GET /adv HTTP/1.1" 200' not in (tmp_path / "launcher.log").read_text(), "tangd served, not the server"


def _one_response(conn: socket.socket) -> bytes:
    """One response framed by Content-Length, read from a connection kept alive."""
    conn.settimeout(DEADLINE)
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator and len(body) >= int(parse_response(head + separator).headers["content-length"]):
            return data
        chunk = conn.recv(65536)
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
