"""`tangd`, the reference-compatible command line, run as real processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tang_server import tangd
from tang_server.http.app import DISCARD_LIMIT

from .support import (
    BIN,
    REFERENCE_TANGD,
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


def _run(program: str, argv: list[str]) -> tuple[int, str, str]:
    """Exit status, standard output and standard error, with the program's own path written as PROGRAM."""
    result = subprocess.run([program, *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout, result.stderr.replace(program, "PROGRAM")


# The installed reference (Debian's tang 11) predates -l, -p and -e: its usage line names only <jwkdir>. Ours
# names the options too; everything else in the line, and the status, must be the reference's.
OUR_OPTIONS = " [-l] [-p <port>] [-e <endpoint>]"


@pytest.mark.parametrize(
    "arrangement",
    [[], ["{missing}"], ["{file}"], ["{dir}", "extra"], ["-x", "{dir}"], ["{missing}", "{dir}"]],
    ids=["no directory", "missing directory", "a file", "extra operand", "unknown option", "two operands"],
)
def test_command_line_errors_as_the_reference(keys: Path, tmp_path: Path, arrangement: list[str]) -> None:
    """Exit status and message compared with /usr/libexec/tangd run the same way."""
    require_tools(str(REFERENCE_TANGD))
    (tmp_path / "file").write_text("not a directory")
    argv = [a.format(missing=tmp_path / "nope", file=tmp_path / "file", dir=keys) for a in arrangement]
    reference = _run(str(REFERENCE_TANGD), argv)
    ours = _run(TANGD, argv)
    assert reference[0] != 0, reference  # each arrangement is an error for the reference
    assert (ours[0], ours[1], ours[2].replace(OUR_OPTIONS, "")) == reference


@pytest.mark.parametrize("port", ["-1", "0", "65536", "http", ""])
def test_invalid_port_is_a_usage_error(keys: Path, port: str) -> None:
    """The reference has no -p to compare with: an invalid port is our usage error, reported as the reference
    reports any usage error (status 1, its usage line), never a traceback."""
    assert _run(TANGD, ["-l", "-p", port, str(keys)]) == (1, "", f"Usage: PROGRAM{OUR_OPTIONS} <jwkdir>\n")


def test_listening_checks_the_directory_as_the_reference_does(tmp_path: Path) -> None:
    """With -l, the directory is checked before listening, with the reference's message and status."""
    require_tools(str(REFERENCE_TANGD))
    missing = str(tmp_path / "nope")
    assert _run(TANGD, ["-l", "-p", str(free_port()), missing]) == _run(str(REFERENCE_TANGD), [missing])


def test_sigterm_exits_cleanly(keys: Path, tmp_path: Path) -> None:
    port = free_port()
    with running([TANGD, "-l", "-p", str(port), str(keys)], port, tmp_path / "log") as server:
        assert request(port, "GET", "/adv").status == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0  # bounds a hang only


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


def test_pipe_mode_ends_the_connection_when_the_server_does(keys: Path) -> None:
    """On plain pipes, the end of our side of the connection reaches the client when the server ends it, as on a
    socket: after a refusal the server goes on reading what the client sends (the lingering close), so standard
    output must close then, not when the process exits."""
    with subprocess.Popen([TANGD, str(keys)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"NOT HTTP\r\n\r\n")
        process.stdin.flush()
        answer = process.stdout.read()  # to the end of standard output
        assert parse_response(answer).status == 400
        # Still lingering, so still reading: had standard output closed with the process, this would be EPIPE.
        process.stdin.write(b"more of the client's bytes")
        process.stdin.close()
        assert process.wait(timeout=30) == 0


def test_pipe_mode_client_sending_on_after_the_end_gets_no_traceback(keys: Path) -> None:
    """A refused client that sends past the discard limit has its connection closed while it still sends: what
    it sends then goes nowhere, quietly (the thread copying standard input used to die with a traceback)."""
    with subprocess.Popen(
        [TANGD, str(keys)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        stdin = process.stdin

        def send() -> None:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(b"NOT HTTP\r\n\r\n" + bytes(4 * DISCARD_LIMIT))  # the limit, then 3 MiB more
                stdin.close()

        # Written by a thread while the answer is read here (communicate() would close standard input under it).
        sending = threading.Thread(target=send)
        sending.start()
        output = process.stdout.read()
        sending.join()
        errors = process.stderr.read()
        assert process.wait(timeout=60) == 0
    assert parse_response(output).status == 400
    assert b"Traceback" not in errors and b"Error" not in errors, errors.decode(errors="replace")


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
