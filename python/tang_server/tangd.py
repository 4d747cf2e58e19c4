"""`tangd`: the reference server's command line, so unit files, containers and scripts keep working.

    tangd [-l] [-p PORT] [-e ENDPOINT] DIR     (options may also follow DIR)

Without `-l` it serves the one HTTP connection on standard input and output (systemd `Accept=yes`, xinetd,
socat); with `-l` it listens on PORT (default 9090) on every address, as the reference does.

Started once per connection, it must start fast. When a `tang-server serve` for DIR runs, the connection is handed
over to it (`handoff.py`) and this process exits; only a plain command line and built-in modules are needed for
that, so everything else (argparse, the server) is imported only once the hand-over is known to be impossible.
"""

from __future__ import annotations

import os
import sys

from tang_server.serving import handoff

TYPE_CHECKING = False  # typing's own costs an import this path cannot afford; mypy treats this name the same
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from tang_server.settings import Settings

DEFAULT_PORT = 9090
USAGE = "Usage: {} [-l] [-p <port>] [-e <endpoint>] <jwkdir>"
_S_IFMT, _S_IFDIR = 0o170000, 0o040000


def parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path
    from typing import NoReturn

    from tang_server.settings import port_number

    class Parser(argparse.ArgumentParser):
        """A command-line error is reported as the reference reports it: its usage line, exit status 1."""

        def error(self, message: str) -> NoReturn:
            print(USAGE.format(sys.argv[0]), file=sys.stderr)
            sys.exit(1)

    tangd = Parser(prog="tangd", description="Tang server (reference-compatible command line)")
    tangd.add_argument(
        "-l",
        dest="listen",
        action="store_true",
        help="listen on PORT instead of serving stdin, with one worker process per CPU this process may use (its "
        "affinity, at most its cgroup's CPU quota rounded up; as `tang-server serve`)",
    )
    tangd.add_argument("-p", dest="port", type=port_number, default=DEFAULT_PORT, help="port (default 9090)")
    tangd.add_argument("-e", dest="endpoint", default="", help="serve under /ENDPOINT")
    tangd.add_argument("directory", type=Path, help="the key directory")
    return tangd


def inetd_arguments(argv: Sequence[str]) -> tuple[str, str] | None:
    """(directory, endpoint) of a plain inetd-mode command line (`[-e EP] [-p PORT] DIR` in any order); None for
    anything else (`-l`, combined or unknown options, a bad port), which argparse then judges."""
    directory, endpoint = None, ""
    position = 0
    while position < len(argv):
        argument = argv[position]
        if argument in ("-e", "-p") and position + 1 < len(argv) and not argv[position + 1].startswith("-"):
            value = argv[position + 1]
            if argument == "-e":
                endpoint = value
            elif not (value.isdigit() and 0 < int(value) < 65536):
                return None
            position += 2
        elif argument.startswith("-") or directory is not None:
            return None
        else:
            directory = argument
            position += 1
    return None if directory is None else (directory, endpoint)


def directory_problem(directory: object) -> str | None:
    """The reference's checks of the key directory and its messages, word for word."""
    try:
        mode = os.stat(str(directory)).st_mode
    except OSError as error:
        return f"Error calling stat() on path: {directory}: {error.strerror}"
    if mode & _S_IFMT != _S_IFDIR:
        return f"Path is not a directory: {directory}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    plain = inetd_arguments(arguments)
    if plain is None:
        args = parser().parse_intermixed_args(arguments)
        directory, endpoint, listen = str(args.directory), args.endpoint, args.listen
    else:
        (directory, endpoint), listen = plain, False
    problem = directory_problem(directory)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    if listen:
        from tang_server.serving import server

        server.serve(settings(directory, endpoint, args.port))
        return 0
    handed_over = handoff.stdin_is_socket() and handoff.hand_over(directory, endpoint)
    if (handed_over or serve_connection(directory, endpoint)) and argv is None:
        _exit_now()  # not after the full server: its logging may hold lines until the interpreter's teardown
    return 0


def _exit_now() -> None:
    """End the process without the interpreter's teardown (a tenth of what a connection costs): the connection
    is answered and closed, what this process wrote went out unbuffered, and the key set (with its Rust-held
    secrets, wiped when dropped) was dropped when the connection was done."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def settings(directory: str, endpoint: str, port: int = DEFAULT_PORT) -> Settings:
    from pathlib import Path

    from tang_server.settings import Settings

    return Settings(
        keys_dir=Path(directory),
        host="0.0.0.0",  # noqa: S104 - the reference binds every address
        port=port,
        prefix=endpoint,
    )


def serve_connection(directory: str, endpoint: str) -> bool:
    """The connection on standard input, served here: plain requests without the event loop or the settings, the
    rest (and everything after it) by the full server. True when no request needed the full server."""
    from tang_server.serving import oneshot

    connection = oneshot.Connection(directory, endpoint)
    try:
        connection.serve()
    except oneshot.Unusual:
        from tang_server.serving import server

        server.serve_connection(settings(directory, endpoint), connection.buffer)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
